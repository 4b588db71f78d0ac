"""PEFT's format both ways, checked against the installed PEFT: rankwise -> to_peft -> PEFT and
PEFT -> save_pretrained -> from_peft give equal outputs for every method the table maps, and what
does not map is refused before anything is written or changed."""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable

import peft
import pytest
import safetensors.torch
import torch
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules

from _models import tiny_gpt2, tiny_llama


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _gpt2() -> nn.Module:
    """Conv1D layers: c_attn 16 -> 48, attn.c_proj 16 -> 16, c_fc 16 -> 64, mlp.c_proj 64 -> 16."""
    return tiny_gpt2().eval()


def _mlp() -> nn.Module:
    """gcd(in, out) is 8, 8 and 16; 24 and 40 are not multiples of 6 (a partial MiSS shard)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 16)).eval()


def _run(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs).logits if inputs.dtype == torch.long else model(inputs)


def _inputs(build: Callable[[], nn.Module]) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 50, (2, 8)) if build is _gpt2 else torch.randn(3, 5, 24)


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            for p in layer.delta.parameters():
                p.add_(0.1 * torch.randn_like(p))


def _randomize_peft(model: nn.Module) -> None:
    """PEFT leaves exactly the adapter (and modules_to_save) trainable; several methods start at zero."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def _assert_equal_and_adapted(theirs: torch.Tensor, ours: torch.Tensor, base: torch.Tensor) -> None:
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the adapter does change the outputs


@pytest.mark.parametrize(
    ("build", "config"),
    [
        (_gpt2, rw.LoRAConfig(rank=4, targets=("c_attn", "c_fc"))),
        (_gpt2, rw.LoRAConfig(rank=4, rslora=True, targets="c_attn")),
        (_gpt2, rw.DoRAConfig(rank=2, targets=("c_attn", "mlp.c_proj"))),
        (_gpt2, rw.GraLoRAConfig(rank=4, alpha=6.0, k=2, targets=("c_attn", "c_fc"))),
        (_mlp, rw.GraLoRAConfig(rank=4, k=2, hybrid_rank=2, dropout=0.1, targets=("0", "2"))),
        (_mlp, rw.C3AConfig(targets=("0", "2", "4"))),  # block_size=None: 8, 8, 16
        (_mlp, rw.C3AConfig(block_size=8, init="xavier_uniform", targets=("0", "2"))),
        (_mlp, rw.BoneConfig(rank=6, targets=("0", "2"))),
        (_mlp, rw.BatConfig(rank=8, targets=("0", "2", "4"))),
    ],
    ids=["lora", "rslora", "dora", "gralora-conv1d", "gralora-hybrid", "c3a-gcd", "c3a", "bone", "bat"],
)
def test_to_peft_loads_in_peft_with_equal_outputs(build, config, tmp_path) -> None:
    ours = rw.adapt(build(), config).eval()  # the new adapter modules start in training mode
    _randomize(ours)
    rw.interop.to_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    x = _inputs(build)
    _assert_equal_and_adapted(_run(theirs, x), _run(ours, x), _run(build(), x))


def test_c3a_per_layer_gcd_becomes_a_block_size_and_a_pattern(tmp_path) -> None:
    ours = rw.adapt(_mlp(), rw.C3AConfig(targets=("0", "2", "4")))
    rw.interop.to_peft(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["block_size"], written["block_size_pattern"]) == (8, {"4": 16})
    theirs = peft.PeftModel.from_pretrained(_mlp(), tmp_path)
    assert theirs.base_model.model[4].block_size["default"] == 16


@pytest.mark.parametrize(
    ("build", "peft_config"),
    [
        (_gpt2, peft.LoraConfig(r=2, use_dora=True, target_modules=["c_attn"])),
        (_gpt2, peft.GraloraConfig(r=4, alpha=6, gralora_k=2, hybrid_r=2, target_modules=["c_attn", "mlp.c_proj"])),
        (_mlp, peft.GraloraConfig(r=4, gralora_k=4, gralora_dropout=0.1, target_modules=["2", "4"])),
        (_mlp, peft.C3AConfig(block_size=8, block_size_pattern={"4": 16}, target_modules=["0", "2", "4"])),
        (_mlp, peft.MissConfig(r=6, miss_dropout=0.1, target_modules=["0", "2"])),
        (_mlp, peft.MissConfig(r=8, init_weights="bat", target_modules=["0", "2", "4"])),
    ],
    ids=["dora", "gralora-conv1d", "gralora", "c3a", "miss", "bat"],
)
def test_from_peft_equals_peft_and_goes_back_unchanged(build, peft_config, tmp_path) -> None:
    reference = peft.get_peft_model(build(), peft_config)
    _randomize_peft(reference)
    reference.eval()
    reference.save_pretrained(tmp_path / "peft")
    x = _inputs(build)

    ours = rw.interop.from_peft(build(), tmp_path / "peft")
    _assert_equal_and_adapted(_run(reference, x), _run(ours.eval(), x), _run(build(), x))

    rw.interop.to_peft(ours, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(build(), tmp_path / "back")
    torch.testing.assert_close(_run(again, x), _run(reference, x), rtol=1e-5, atol=1e-5)


def test_round_trip_with_head_convolution_and_a_rank_pattern(tmp_path) -> None:
    torch.manual_seed(0)
    base = Classifier()
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["0", "2", "conv"],
            modules_to_save=["head"],
            rank_pattern={"2": 2},
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        reference.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    reference.save_pretrained(tmp_path / "peft")

    ours = rw.interop.from_peft(copy.deepcopy(base), tmp_path / "peft")
    assert ours.encoder[2].delta.A.shape == (2, 16) and ours.encoder[0].delta.A.shape == (4, 8)
    assert ours.head.weight.requires_grad
    x, image = torch.randn(5, 8), torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.conv(image), reference.base_model.model.conv(image), rtol=1e-5, atol=1e-5)

    rw.interop.to_peft(ours, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    torch.testing.assert_close(again(x), reference(x), rtol=1e-5, atol=1e-5)


def _conv(**options) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, **options), nn.ReLU()).eval()


@pytest.mark.parametrize(
    "options",
    [
        {"kernel_size": 3, "stride": 2, "padding": 2},
        {"kernel_size": (3, 2), "stride": (1, 3), "padding": (0, 1)},
        # dilation along an axis whose kernel is 1 wide changes nothing; PEFT computes the same
        {"kernel_size": (1, 3), "stride": 2, "padding": 1, "dilation": (3, 1)},
        {"kernel_size": 1, "dilation": 2},
    ],
    ids=["stride-padding", "rectangular", "dilated-1-wide-axis", "dilated-1x1"],
)
def test_lora_on_a_strided_padded_conv2d_equals_peft_both_ways(options, tmp_path) -> None:
    build = functools.partial(_conv, **options)
    image = torch.randn(2, 3, 9, 9)
    ours = rw.adapt(build(), rw.LoRAConfig(rank=2, targets="0")).eval()
    _randomize(ours)
    rw.interop.to_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    _assert_equal_and_adapted(_run(theirs, image), _run(ours, image), _run(build(), image))

    reference = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    reference.save_pretrained(tmp_path / "peft")
    loaded = rw.interop.from_peft(build(), tmp_path / "peft").eval()
    _assert_equal_and_adapted(_run(reference.eval(), image), _run(loaded, image), _run(build(), image))


@pytest.mark.parametrize(
    ("options", "dilation"),
    [
        ({"kernel_size": 3, "stride": 4, "padding": 2, "dilation": 2}, "(2, 2)"),
        ({"kernel_size": (1, 3), "dilation": (1, 2)}, "(1, 2)"),
    ],
    ids=["dilated", "dilated-along-the-kernel"],
)
def test_lora_on_a_dilated_conv2d_is_refused_both_ways(options, dilation, tmp_path) -> None:
    # PEFT's LoRA conv layer builds lora_A without the base's dilation: it would compute another output.
    message = (
        rf"'0': PEFT's LORA layer for Conv2d does not apply the base layer's dilation={re.escape(dilation)}, "
        "so PEFT would compute another output than rankwise; leave this layer out of the targets"
    )
    ours = rw.adapt(_conv(**options), rw.LoRAConfig(rank=2, targets="0"))
    before = _snapshot(ours)
    with pytest.raises(ValueError, match=f"^{message}$"):
        rw.interop.to_peft(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _assert_same(_snapshot(ours), before)

    peft.get_peft_model(_conv(**options), peft.LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path)
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    base = _conv(**options)
    before = _snapshot(base)
    with pytest.raises(rw.CheckpointError, match=f"^{re.escape(str(tmp_path))}: {message}$"):
        rw.interop.from_peft(base, tmp_path)
    _assert_same(_snapshot(base), before)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == files


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, type]]:
    """A model's tensors, which of its parameters train, and its module types."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = {k: p.requires_grad for k, p in model.named_parameters()}
    return state, trained, {k: type(m) for k, m in model.named_modules()}


def _assert_same(after: tuple, before: tuple) -> None:
    (state, trained, types), (state0, trained0, types0) = after, before
    assert state.keys() == state0.keys() and all(torch.equal(state[k], state0[k]) for k in state)
    assert (trained, types) == (trained0, types0)


def _nested() -> nn.Module:
    """Paths '0' and '1.0': PEFT's target name '0' selects both."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))


def test_to_peft_selects_only_the_adapted_layers(tmp_path) -> None:
    ours = rw.adapt(_nested(), rw.LoRAConfig(rank=2, targets="re:0"))
    _randomize(ours)
    rw.interop.to_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "0"
    theirs = peft.PeftModel.from_pretrained(_nested(), tmp_path)
    assert isinstance(theirs.base_model.model[1][0], nn.Linear)  # not wrapped by PEFT
    x = torch.randn(4, 8)
    torch.testing.assert_close(_run(theirs, x), _run(ours, x), rtol=1e-5, atol=1e-5)


def test_a_pattern_peft_cannot_write_back_is_refused(tmp_path) -> None:
    # PEFT's key '^0' gives rank 2 to '0' only; written back as '0' it would also reach '1.0'.
    reference = peft.get_peft_model(_nested(), peft.LoraConfig(r=4, rank_pattern={"^0": 2}, target_modules=["0"]))
    reference.save_pretrained(tmp_path / "peft")
    ours = rw.interop.from_peft(_nested(), tmp_path / "peft")
    assert (ours[0].delta.A.shape[0], ours[1][0].delta.A.shape[0]) == (2, 4)
    with pytest.raises(ValueError, match=r"rank_pattern \{'0': 2\} cannot give \['1.0'\] their own rank"):
        rw.interop.to_peft(ours, tmp_path / "back")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize(
    ("build", "config", "message"),
    [
        (_gpt2, rw.C3AConfig(block_size=16, targets="c_attn"), r"C3A does not support Conv1D \('transformer.h.0"),
        (_gpt2, rw.BoneConfig(rank=4, targets="c_fc"), "PEFT's MISS does not support Conv1D"),
        (_gpt2, rw.BatConfig(rank=4, targets="c_fc"), "PEFT's MISS does not support Conv1D"),
        (
            lambda: nn.Sequential(nn.Conv2d(4, 8, 1)),
            rw.GraLoRAConfig(rank=2, targets="0"),
            "GRALORA does not support Conv2d",
        ),
        (
            _mlp,
            rw.LoLDUConfig(rank=2, targets="0"),
            r"PEFT export supports \['lora', 'dora', 'c3a', 'gralora', 'bone', 'bat'\], not 'loldu'",
        ),
    ],
    ids=["c3a-conv1d", "bone-conv1d", "bat-conv1d", "gralora-conv2d", "loldu"],
)
def test_to_peft_refuses_what_peft_cannot_express_and_writes_nothing(build, config, message, tmp_path) -> None:
    ours = rw.adapt(build(), config)
    with pytest.raises(ValueError, match=message):
        rw.interop.to_peft(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("peft_config", "message"),
    [
        (peft.LoraConfig(r=2, target_modules=["0"], bias="all"), "'bias': 'all'"),
        (peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"), "'init_lora_weights': 'pissa'"),
        (peft.C3AConfig(block_size=8, target_modules=["0"], bias="c3a_only"), "'bias': 'c3a_only'"),
        (peft.GraloraConfig(r=4, target_modules=["0"], bias="all"), "'bias': 'all'"),
        (peft.MissConfig(r=4, target_modules=["0", "2"], exclude_modules=["2"]), r"'exclude_modules': \['2'\]"),
        (
            peft.MissConfig(r=4, target_modules=["0"], init_weights="mini", mini_r=4),
            "PEFT MISS with {'init_weights': 'mini'} has no rankwise form",
        ),
        (
            peft.IA3Config(target_modules=["0"], feedforward_modules=[]),
            r"PEFT type 'IA3' is not supported; rankwise reads \['C3A'",
        ),
    ],
    ids=["lora-bias", "pissa", "c3a-bias", "gralora-bias", "miss-exclude", "miss-mini", "ia3"],
)
def test_from_peft_refuses_what_it_does_not_model_and_leaves_the_model_alone(peft_config, message, tmp_path) -> None:
    base = _mlp()
    peft.get_peft_model(copy.deepcopy(base), peft_config).save_pretrained(tmp_path)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(rw.CheckpointError, match=message):
        rw.interop.from_peft(base, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not list(adapted_modules(base))


def test_from_peft_names_tensors_that_do_not_fit(tmp_path) -> None:
    torch.manual_seed(0)
    peft.get_peft_model(Classifier(), peft.LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path)
    other = nn.Sequential()
    other.encoder = nn.Sequential(nn.Linear(8, 32))
    with pytest.raises(rw.CheckpointError, match=r"mis-shaped keys.*encoder\.0\.lora_B"):
        rw.interop.from_peft(other, tmp_path)


def test_from_peft_names_a_block_size_the_layer_does_not_allow(tmp_path) -> None:
    peft.get_peft_model(_mlp(), peft.C3AConfig(block_size=8, target_modules=["0"])).save_pretrained(tmp_path)
    other = nn.Sequential(nn.Linear(24, 36))
    message = r"c3a on '0': block_size=8 must divide in_features=24 and out_features=36"
    with pytest.raises(rw.CheckpointError, match=message):
        rw.interop.from_peft(other, tmp_path)
    assert not list(adapted_modules(other))


def _llama(tied: bool = True, classes: int = 0) -> nn.Module:
    """A tiny Llama: a causal LM whose head is tied to its embedding, or a sequence classifier."""
    return tiny_llama(
        50,
        classes=classes,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    ).eval()


def _untied(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


@pytest.mark.parametrize(("build", "target"), [(_gpt2, "c_attn"), (_llama, "q_proj")], ids=["gpt2", "llama"])
def test_from_peft_refuses_a_tied_module_to_save_and_equals_peft_once_untied(build, target, tmp_path) -> None:
    reference = peft.get_peft_model(
        build(), peft.LoraConfig(r=2, target_modules=[target], modules_to_save=["lm_head"], init_lora_weights=False)
    )
    _randomize_peft(reference)
    reference.eval()
    reference.save_pretrained(tmp_path)

    tied = build()
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    before = copy.deepcopy(tied.state_dict())
    with pytest.raises(rw.CheckpointError, match=r"own copy of modules_to_save 'lm_head'.*'lm_head.weight' is tied to"):
        rw.interop.from_peft(tied, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in tied.state_dict().items()) and not list(adapted_modules(tied))

    x = _inputs(_gpt2)
    ours = rw.interop.from_peft(_untied(build()), tmp_path)
    _assert_equal_and_adapted(_run(reference, x), _run(ours.eval(), x), _run(build(), x))


@pytest.mark.parametrize(
    ("build", "target", "embedding"),
    [(_gpt2, "c_attn", "transformer.wte"), (_llama, "q_proj", "model.embed_tokens")],
    ids=["gpt2", "llama"],
)
def test_to_peft_of_a_tied_trainable_head_saves_its_embedding_too(build, target, embedding, tmp_path) -> None:
    ours = rw.adapt(build(), rw.LoRAConfig(rank=2, targets=target, trainable="lm_head")).eval()
    _randomize(ours)
    with torch.no_grad():
        ours.lm_head.weight.add_(0.1 * torch.randn_like(ours.lm_head.weight))  # and so the embedding
    rw.interop.to_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head", embedding]
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    x = _inputs(_gpt2)
    _assert_equal_and_adapted(_run(theirs, x), _run(ours, x), _run(build(), x))

    back = rw.interop.from_peft(build(), tmp_path).eval()  # both saved, equal: one tied tensor again
    torch.testing.assert_close(_run(back, x), _run(ours, x), rtol=1e-5, atol=1e-5)


def test_from_peft_refuses_tied_modules_to_save_that_peft_trained_apart(tmp_path) -> None:
    reference = peft.get_peft_model(
        _gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head", "wte"])
    )
    _randomize_peft(reference)  # PEFT's two copies now differ
    reference.save_pretrained(tmp_path)
    model = _gpt2()
    with pytest.raises(
        rw.CheckpointError, match=r"'transformer.wte.weight' and 'lm_head.weight' hold different values"
    ):
        rw.interop.from_peft(model, tmp_path)
    assert not list(adapted_modules(model))


def test_to_peft_refuses_a_trainable_module_tied_to_an_adapted_layer(tmp_path) -> None:
    ours = rw.adapt(_gpt2(), rw.LoRAConfig(rank=2, targets="lm_head", trainable="wte"))
    with pytest.raises(ValueError, match=r"trainable 'transformer.wte' shares 'weight' with 'lm_head.base.weight'"):
        rw.interop.to_peft(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_peft_skips_modules_to_save_the_model_lacks_as_peft_does(tmp_path) -> None:
    """PEFT's sequence-classification adapters list both 'classifier' and 'score'; Llama has 'score'."""
    reference = peft.get_peft_model(
        _llama(classes=3),
        peft.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
    )
    _randomize_peft(reference)
    reference.eval()
    reference.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]

    ours = rw.interop.from_peft(_llama(classes=3), tmp_path).eval()
    assert ours.score.weight.requires_grad
    x = torch.randint(1, 50, (2, 8))
    _assert_equal_and_adapted(_run(reference, x), _run(ours, x), _run(_llama(classes=3), x))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_an_embedding_adapter_goes_both_ways_with_peft(dora, tmp_path) -> None:
    # PEFT's lora_embedding_A (r, vocabulary) and lora_embedding_B (dim, r) are our A and B.
    targets = ["embed_tokens", "q_proj"]
    reference = peft.get_peft_model(
        _llama(tied=False), peft.LoraConfig(r=2, target_modules=targets, use_dora=dora, init_lora_weights=False)
    )
    _randomize_peft(reference)
    with torch.no_grad():  # PEFT saves the adapted embedding's weight and loads it: a changed one too
        reference.base_model.model.model.embed_tokens.base_layer.weight[5:].add_(0.5)
    reference.save_pretrained(tmp_path / "peft")
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    x[:, 0] = 0  # the padding token
    ours = rw.interop.from_peft(_llama(tied=False), tmp_path / "peft")
    assert ours.model.embed_tokens.kind == "embedding"
    assert ours.model.embed_tokens.delta.A.shape == (2, 50)
    _assert_equal_and_adapted(_run(reference, x), _run(ours, x), _run(_llama(tied=False), x))

    rw.interop.to_peft(ours, tmp_path / "back")
    written = safetensors.torch.load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert written["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (16, 2)
    assert torch.equal(written["base_model.model.model.embed_tokens.base_layer.weight"], ours.model.embed_tokens.weight)
    again = peft.PeftModel.from_pretrained(_llama(tied=False), tmp_path / "back")
    torch.testing.assert_close(_run(again, x), _run(reference, x), rtol=1e-5, atol=1e-5)


def test_adding_an_embedding_adapter_leaves_the_shared_base_weight_as_it_is(tmp_path) -> None:
    # PEFT saves the adapted embedding's weight; beside another adapter that base is the other's too.
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4))

    source = rw.adapt(build(), rw.LoRAConfig(rank=2, targets=("0", "1")))
    rw.interop.to_peft(source, tmp_path / "same")
    with torch.no_grad():
        source[0].base.weight.add_(1.0)  # another base, e.g. resized and trained elsewhere
    rw.interop.to_peft(source, tmp_path / "other")
    model = rw.adapt(build(), rw.LoRAConfig(rank=2, targets=("0", "1")))
    x = torch.tensor([[1, 2, 3]])
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rw.CheckpointError, match=r"tensors \['base_model.model.0.base_layer.weight'\] that differ"):
        rw.interop.from_peft(model, tmp_path / "other", name="b")
    assert rw.adapter_names(model) == ["default"]
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    rw.interop.from_peft(model, tmp_path / "same", name="b")  # the model's own weight: nothing written
    assert torch.equal(model[0].base.weight, state["0.base.weight"])
    assert torch.equal(model(x), before)


def test_named_adapters_go_to_peft_and_back_each_by_name(tmp_path) -> None:
    ours = rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets=("0", "2")), name="sql").eval()
    rw.adapt(ours, rw.LoRAConfig(rank=4, alpha=2.0, targets=("2", "4")), name="chat")
    with torch.no_grad():
        for _, layer in adapted_modules(ours):
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    rw.interop.to_peft(ours, tmp_path / "ours")  # several: one subfolder per adapter
    theirs = peft.PeftModel.from_pretrained(_mlp(), tmp_path / "ours" / "sql", adapter_name="sql")
    theirs.load_adapter(tmp_path / "ours" / "chat", adapter_name="chat")
    x, base = _inputs(_mlp), _run(_mlp(), _inputs(_mlp))
    for active in (["sql"], ["chat"], ["sql", "chat"]):  # PEFT's several active adapters add, as ours do
        theirs.base_model.set_adapter(active)
        rw.set_active(ours, active)
        _assert_equal_and_adapted(_run(theirs, x), _run(ours, x), base)

    # Back: PEFT writes each adapter in its own subfolder (no default one); each loads from it. The
    # names are no substring of a key: PEFT 0.19 picks an adapter's keys by substring, so it would
    # write every key into the folder of an adapter named "a".
    theirs.save_pretrained(tmp_path / "peft")
    back = rw.interop.from_peft(_mlp(), tmp_path / "peft" / "sql", name="sql")
    rw.interop.from_peft(back, tmp_path / "peft" / "chat", name="chat")
    assert rw.adapter_names(back) == ["sql", "chat"] and rw.active_adapters(back) == ["sql"]
    for active in (["sql"], ["chat"], ["sql", "chat"]):
        rw.set_active(back, active)
        rw.set_active(ours, active)
        torch.testing.assert_close(_run(back.eval(), x), _run(ours, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already has an adapter named 'chat'"):
        rw.interop.from_peft(back, tmp_path / "peft" / "chat", name="chat")


def test_each_named_adapter_exports_the_models_trainable_head(tmp_path) -> None:
    # The head (given with the first adapter) is trained with every adapter: each export carries it.
    ours = rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets=("0",), trainable=("4",)))
    rw.adapt(ours, rw.LoRAConfig(rank=2, targets=("2",)), name="b")
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if "adapters" in key or key.startswith("4."):
                p.add_(0.1 * torch.randn_like(p))
    x = _inputs(_mlp)
    outputs = {}
    for name in ("default", "b"):
        rw.set_active(ours, name)
        outputs[name] = _run(ours, x)
    rw.interop.to_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "b" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["4"]
    alone = rw.interop.from_peft(_mlp(), tmp_path / "peft" / "b")
    torch.testing.assert_close(_run(alone, x), outputs["b"], rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(_mlp(), tmp_path / "peft" / "b")
    torch.testing.assert_close(_run(theirs, x), outputs["b"], rtol=1e-6, atol=1e-6)

    both = rw.interop.from_peft(_mlp(), tmp_path / "peft" / "default")
    rw.interop.from_peft(both, tmp_path / "peft" / "b", name="b")  # the model's own head: checked, not written
    for name in ("default", "b"):
        rw.set_active(both, name)
        torch.testing.assert_close(_run(both, x), outputs[name], rtol=0, atol=0)
    with torch.no_grad():
        alone[4].bias.add_(1.0)
    with pytest.raises(rw.CheckpointError, match=r"tensors \['base_model.model.4.bias'\] that differ"):
        rw.interop.from_peft(alone, tmp_path / "peft" / "default", name="again")
    assert rw.adapter_names(alone) == ["default"]


def test_from_peft_refuses_to_add_an_adapter_on_the_models_trainable_head(tmp_path) -> None:
    # Added beside others, an adapter once wrapped the head given with the first adapter and froze it.
    rw.interop.to_peft(rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets=("2", "4"))), tmp_path)
    model = rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets=("0",), trainable=("4",)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    both = r"modules are both targets and trainable \(target '4' is trainable '4'\)"
    with pytest.raises(rw.CheckpointError, match=both):
        rw.interop.from_peft(model, tmp_path, name="b")
    assert rw.adapter_names(model) == ["default"] and isinstance(model[4], nn.Linear)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("merged", [["b"], ["a"], ["a", "b"]], ids=["b", "other", "both"])
def test_to_peft_of_a_merged_model_writes_the_embeddings_unmerged_weight(merged, tmp_path) -> None:
    # PEFT adds ΔW to the base_layer.weight it loads: the merged weight there would add it twice.
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4)).eval()

    ours = rw.adapt(build(), rw.LoRAConfig(rank=2, targets=("0", "1")), name="a")
    rw.adapt(ours, rw.LoRAConfig(rank=3, targets=("0",)), name="b")
    with torch.no_grad():
        for _, layer in adapted_modules(ours):
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    x = torch.tensor([[1, 2, 3, 9]])

    def run(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    rw.set_active(ours, "b")
    want = run(ours)
    key = "base_model.model.0.base_layer.weight"

    def export(folder: str) -> dict[str, torch.Tensor]:
        rw.interop.to_peft(ours, tmp_path / folder, name="b")
        return safetensors.torch.load_file(tmp_path / folder / "adapter_model.safetensors")

    unmerged = export("unmerged")
    assert torch.equal(unmerged[key], build()[0].weight)
    rw.set_active(ours, merged)
    rw.merge(ours)
    written = export("merged")
    rw.unmerge(ours)
    assert written.keys() == unmerged.keys()
    assert all(torch.equal(written[k], unmerged[k]) for k in written if k != key)  # the adapter's own tensors
    # W0 as unmerge restores it: bit for bit what an export after unmerge writes; the original within
    # float32 rounding where one adapter is merged (W0 + ΔW − ΔW), bit for bit where several (a copy).
    assert torch.equal(written[key], export("after unmerge")[key])
    torch.testing.assert_close(written[key], unmerged[key], rtol=0, atol=0 if len(merged) > 1 else 1e-6)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "merged")
    _assert_equal_and_adapted(run(theirs), want, run(build()))
    back = rw.interop.from_peft(build(), tmp_path / "merged").eval()
    torch.testing.assert_close(run(back), want, rtol=0, atol=1e-6)
