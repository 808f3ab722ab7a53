"""Weight arithmetic (llama_pt.pretrained.weight_arithmetic): deltas that give the target back bit for bit,
weighted averages, and the one-line refusals of `python -m llama_pt.pretrained make-delta/apply-delta/average`."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_pt.atomic import leftovers
from llama_pt.hf_interop import export_hf, import_hf
from llama_pt.model import Llama, ModelConfig
from llama_pt.pretrained import main
from llama_pt.pretrained.weight_arithmetic import DELTA_FILE, PATCHES_FILE, Weights, add, subtract
from llama_pt.train.checkpoint import save_checkpoint

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=64)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PRECISION = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11, torch.float64: 53}  # significand bits
WIDE = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}  # the delta's


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def trained_like(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """float32 weights shaped like a trained Llama's: matrices N(0, 1/fan_in) with 1% outliers 30x larger
    (LLM.int8()'s outlier features), norm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(cfg).state_dict().items()}
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) / shape[-1] ** 0.5
            weights[name] = torch.where(torch.rand(shape, generator=g) < 0.01, 30 * w, w)
    return weights


def fine_tuned(cfg: ModelConfig, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, target): trained_like weights and their update by a tenth of the weights' size, with every hard
    case planted in each matrix: targets 2^-k times their base (k up to 100: weights fine-tuned to nearly zero)
    and bases 2^-k times their target, zeros of both signs in either, float32 subnormals, unchanged weights."""
    g = torch.Generator().manual_seed(seed)
    base, target = trained_like(cfg, seed), {}
    k = torch.arange(1, 101, dtype=torch.float32)
    for name, t in base.items():
        a = t.reshape(-1)  # a view: the planted base values land in `base`
        b = a + 0.1 * a.abs().mean() * torch.randn(a.shape, generator=g)
        target[name] = b.reshape(t.shape)
        if name.endswith("norm.weight"):  # 64 elements: updated only
            continue
        b[:100] = a[:100] * 2.0 ** -k                      # the base dominates
        a[100:200] = b[100:200] * 2.0 ** -k                # the target dominates
        b[200:210], b[210:220] = 0.0, -0.0
        a[220:230], a[230:240] = -0.0, 0.0
        b[220:240] = torch.tensor([0.0, -0.0]).repeat(10)
        b[240:250] = 1e-40 * torch.randn(10, generator=g)
        b[250:260] = a[250:260]
    return base, target


def round_trip_failures(make, apply, base: torch.Tensor, target: torch.Tensor) -> int:
    """Elements where apply(base, make(base, target)) differs from target in any bit."""
    return int((bits(apply(base, make(base, target))) != bits(target)).sum())


def own_dtype_make(base, target):
    """The wrong way: the difference rounded to the weights' own dtype."""
    return target - base


def own_dtype_apply(base, delta):
    return base + delta


def wide_make(base, target):
    """The difference in the wide dtype, without patches."""
    return target.to(WIDE[target.dtype]) - base.to(WIDE[target.dtype])


def wide_apply(base, delta_in_wide):
    return (base.to(delta_in_wide.dtype) + delta_in_wide).to(base.dtype)


def patched_make(base, target):
    return subtract(base, target)


def patched_apply(base, delta):
    return add(base, delta[0], base.dtype, delta[1], delta[2])


# ------------------------------------------------------------------------------------------- the arithmetic
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("data", ["random", "trained_like"])
def test_delta_round_trip_is_bitwise_and_the_wrong_ways_are_not(dtype, data):
    if data == "random":  # independent weights spread over 2^±40: every exponent gap, either way round
        g = torch.Generator().manual_seed(0)
        base, target = (torch.randn(200_000, generator=g) * 2.0 ** torch.randint(-40, 40, (200_000,), generator=g)
                        for _ in range(2))
        if dtype == torch.float16:  # keep to float16's range
            base, target = base.clamp(-6e4, 6e4), target.clamp(-6e4, 6e4)
        pairs = [(base.to(dtype), target.to(dtype))]
    else:
        base, target = fine_tuned(CFG, seed=0)
        pairs = [(base[n].to(dtype), target[n].to(dtype)) for n in base]
    for a, b in pairs:
        assert round_trip_failures(patched_make, patched_apply, a, b) == 0
    assert sum(round_trip_failures(own_dtype_make, own_dtype_apply, a, b) for a, b in pairs) > 1000
    wide_failures = sum(round_trip_failures(wide_make, wide_apply, a, b) for a, b in pairs)
    assert wide_failures > 0  # the patches are needed
    assert wide_failures == sum(subtract(a, b)[1].numel() for a, b in pairs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patches_are_only_where_the_exponent_gap_argument_says(dtype):
    """Patched elements are negative zeros or targets more than 2^(p_W - p_T - 2) times smaller than their
    base (the docstring's bound); everything else comes back from the wide sum alone. Among the ordinary
    fine-tuned weights (not the planted cases) patches are rarer than 1 in 10^4."""
    base, target = fine_tuned(CFG, seed=2)
    p_t, p_w = PRECISION[dtype], PRECISION[WIDE[dtype]]
    planted = ordinary = n_ordinary = 0
    for name in base:
        a, b = base[name].to(dtype).reshape(-1), target[name].to(dtype).reshape(-1)
        _, index, values = subtract(a, b)
        assert same_bits(values, b[index])
        a64, b64 = a[index].double(), b[index].double()
        negative_zero = (b64 == 0) & torch.signbit(b64)
        assert bool((negative_zero | (b64.abs() < 2.0 ** (p_t + 2 - p_w) * a64.abs())).all()), name
        first_ordinary = 0 if name.endswith("norm.weight") else 260  # fine_tuned plants in [0, 260)
        planted += int((index < first_ordinary).sum())
        ordinary += int((index >= first_ordinary).sum())
        n_ordinary += a.numel() - first_ordinary
    assert planted > 0 and ordinary < 1e-4 * n_ordinary


def test_base_far_larger_than_target_needs_a_patch():
    """The docstring's example: base 1, target 2^-60 in float32; the float64 difference is -1 and 1 + (-1) = 0."""
    a, b = torch.tensor([1.0]), torch.tensor([2.0 ** -60])
    assert wide_apply(a, wide_make(a, b)).item() == 0.0
    delta, index, values = subtract(a, b)
    assert delta.item() == -1.0 and index.tolist() == [0] and same_bits(add(a, delta, a.dtype, index, values), b)


# ------------------------------------------------------------------------------------------- the commands
def hf_folder(path, weights, dtype, cfg=CFG, tokenizer=None):
    return export_hf({n: t.to(dtype) for n, t in weights.items()}, cfg, path, tokenizer_path=tokenizer, dtype=dtype)


def checkpoint_folder(root, weights, cfg=CFG):
    model = Llama(cfg)
    model.load_state_dict(weights)
    return save_checkpoint(root, 1, {"model": model.state_dict()}, {"model_config": cfg.to_dict(), "step": 1})


def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def refused(capsys, argv, out) -> str:
    """Run a command that must be refused: exit status 2, one line on stderr, nothing written at `out`."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and leftovers(out) == []
    return err.removeprefix("error: ").strip()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_make_and_apply_delta_give_the_target_folder_byte_for_byte(tmp_path, tokenizer_512, dtype, capsys):
    base, target = fine_tuned(CFG, seed=4)
    hf_folder(tmp_path / "base", base, dtype)
    hf_folder(tmp_path / "target", target, dtype, tokenizer=tokenizer_512)
    assert main(["make-delta", str(tmp_path / "base"), str(tmp_path / "target"), str(tmp_path / "delta")]) == 0
    assert main(["apply-delta", str(tmp_path / "base"), str(tmp_path / "delta"), str(tmp_path / "rebuilt")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "delta"), str(tmp_path / "rebuilt")]
    assert files_of(tmp_path / "rebuilt") == files_of(tmp_path / "target")

    delta = tmp_path / "delta"
    manifest = json.loads((delta / DELTA_FILE).read_text())
    wide = str(WIDE[dtype]).removeprefix("torch.")
    assert manifest["delta_dtype"] == wide and manifest["target"]["dtype"] == manifest["base"]["dtype"]
    patches = load_file(str(delta / PATCHES_FILE))
    assert manifest["patched_elements"] == sum(t.numel() for k, t in patches.items() if k.endswith(".index")) > 0
    assert json.loads((delta / "config.json").read_text())["torch_dtype"] == wide
    assert {str(t.dtype) for t in load_file(str(delta / "model.safetensors")).values()} == {f"torch.{wide}"}
    assert (delta / "tokenizer.model").read_bytes() == tokenizer_512.read_bytes()


def test_a_checkpoint_is_a_base_like_a_folder(tmp_path, capsys):
    """BASE a training checkpoint (float32), TARGET a bfloat16 folder: the delta is float32, the target comes
    back bit for bit, from the checkpoint or from its float32 export (the same weights and architecture); the
    same weights in another dtype are refused as a base."""
    base, target = fine_tuned(CFG, seed=6)
    ckpt = checkpoint_folder(tmp_path / "ckpt", base)
    hf_folder(tmp_path / "target", target, torch.bfloat16)
    assert main(["make-delta", str(ckpt), str(tmp_path / "target"), str(tmp_path / "delta")]) == 0
    assert main(["apply-delta", str(ckpt), str(tmp_path / "delta"), str(tmp_path / "rebuilt")]) == 0
    assert files_of(tmp_path / "rebuilt") == files_of(tmp_path / "target")
    hf_folder(tmp_path / "base_fp32", base, torch.float32)
    assert main(["apply-delta", str(tmp_path / "base_fp32"), str(tmp_path / "delta"), str(tmp_path / "again")]) == 0
    assert files_of(tmp_path / "again") == files_of(tmp_path / "target")
    hf_folder(tmp_path / "base_bf16", base, torch.bfloat16)
    capsys.readouterr()
    message = refused(capsys, ["apply-delta", tmp_path / "base_bf16", tmp_path / "delta", tmp_path / "out"],
                      tmp_path / "out")
    assert message.startswith(f"{tmp_path / 'base_bf16'} holds bfloat16 weights, the base of {tmp_path / 'delta'} "
                              "held float32 ones")


def test_apply_delta_refuses_another_base_in_one_line(tmp_path, capsys):
    base, target = fine_tuned(CFG, seed=8)
    hf_folder(tmp_path / "base", base, torch.float32)
    hf_folder(tmp_path / "target", target, torch.float32)
    assert main(["make-delta", str(tmp_path / "base"), str(tmp_path / "target"), str(tmp_path / "delta")]) == 0
    out, delta = tmp_path / "out", tmp_path / "delta"

    hf_folder(tmp_path / "other", trained_like(CFG, seed=10), torch.float32)
    message = refused(capsys, ["apply-delta", tmp_path / "other", delta, out], out)
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'other'))} is not the base of {re.escape(str(delta))}: its "
                        r"weights' sha256 is [0-9a-f]{16}…, the delta was made from [0-9a-f]{16}…", message)

    hf_folder(tmp_path / "theta", base, torch.float32, cfg=ModelConfig(**{**CFG.to_dict(), "rope_theta": 5e5}))
    assert refused(capsys, ["apply-delta", tmp_path / "theta", delta, out], out) == (
        f"{tmp_path / 'theta'} is not the base of {delta}: config field rope_theta is 500000.0, "
        "the delta's base had 10000.0")

    wider = ModelConfig(**{**CFG.to_dict(), "dim": 96, "n_heads": 6})
    hf_folder(tmp_path / "wider", trained_like(wider, seed=11), torch.float32, cfg=wider)
    message = refused(capsys, ["apply-delta", tmp_path / "wider", delta, out], out)
    name, theirs, ours = re.fullmatch(rf"tensor '([^']+)' has shape (\(.*?\)) in {re.escape(str(tmp_path / 'wider'))}"
                                      rf" but (\(.*?\)) in {re.escape(str(delta))}", message).groups()
    assert theirs == str(tuple(import_hf(tmp_path / "wider")[1][name].shape))
    assert ours == str(tuple(import_hf(delta)[1][name].shape)) != theirs

    assert refused(capsys, ["apply-delta", tmp_path / "base", tmp_path / "target", out], out) == (
        f"{tmp_path / 'target'} is not a llama_pt delta folder (no {DELTA_FILE}; make it with make-delta)")
    assert refused(capsys, ["make-delta", tmp_path / "base", tmp_path / "wider", out], out).startswith("tensor '")
    hf_folder(tmp_path / "f64", target, torch.float64)
    assert refused(capsys, ["make-delta", tmp_path / "base", tmp_path / "f64", out], out) == (
        f"{tmp_path / 'f64'} holds float64 weights; deltas are made of float32, bfloat16 or float16 weights")

    save_file({}, str(delta / PATCHES_FILE))  # the patches lost: base + delta is no longer the target
    assert refused(capsys, ["apply-delta", tmp_path / "base", delta, out], out) == (
        f"{delta} is damaged: base + delta does not match the target's sha256 in {DELTA_FILE}")


def test_average_is_the_weighted_mean_in_float64(tmp_path, capsys):
    models = [trained_like(CFG, seed=s) for s in (12, 13, 14)]
    for i, m in enumerate(models):
        hf_folder(tmp_path / f"m{i}", m, torch.bfloat16)
    assert main(["average", str(tmp_path / "soup"), str(tmp_path / "m0"), str(tmp_path / "m1"),
                 "--weights", "1", "3"]) == 0
    _, soup = import_hf(tmp_path / "soup")
    for name, t in soup.items():
        a, b = (m[name].to(torch.bfloat16).double() for m in models[:2])
        assert same_bits(t, (0.25 * a + 0.75 * b).to(torch.bfloat16)), name

    assert main(["average", str(tmp_path / "equal")] + [str(tmp_path / f"m{i}") for i in range(3)]) == 0
    _, equal = import_hf(tmp_path / "equal")
    for name, t in equal.items():
        a, b, c = (m[name].to(torch.bfloat16).double() for m in models)
        assert same_bits(t, (a * (1 / 3) + b * (1 / 3) + c * (1 / 3)).to(torch.bfloat16)), name

    # Dtypes differ (a float32 checkpoint and a bfloat16 folder): the average is float32.
    ckpt = checkpoint_folder(tmp_path / "ckpt", models[2])
    assert main(["average", str(tmp_path / "mixed"), str(ckpt), str(tmp_path / "m0")]) == 0
    _, mixed = import_hf(tmp_path / "mixed")
    for name, t in mixed.items():
        expected = 0.5 * models[2][name].double() + 0.5 * models[0][name].to(torch.bfloat16).double()
        assert same_bits(t, expected.float()), name


def test_average_refuses_incompatible_models_in_one_line(tmp_path, tokenizer_512, capsys):
    out = tmp_path / "soup"
    hf_folder(tmp_path / "a", trained_like(CFG, seed=15), torch.float32)
    deeper = ModelConfig(**{**CFG.to_dict(), "n_layers": 3})
    hf_folder(tmp_path / "deeper", trained_like(deeper, seed=16), torch.float32, cfg=deeper)
    wider = ModelConfig(**{**CFG.to_dict(), "dim": 96, "n_heads": 6})
    hf_folder(tmp_path / "wider", trained_like(wider, seed=17), torch.float32, cfg=wider)
    theta = ModelConfig(**{**CFG.to_dict(), "rope_theta": 5e5})
    hf_folder(tmp_path / "theta", trained_like(theta, seed=18), torch.float32, cfg=theta)
    a, deep, wide = (str(tmp_path / n) for n in ("a", "deeper", "wider"))

    assert re.fullmatch(rf"tensor 'layers\.2\.[a-z_.0-9]+' of {re.escape(deep)} is missing from {re.escape(a)}",
                        refused(capsys, ["average", out, deep, a], out))
    assert re.fullmatch(rf"{re.escape(deep)} has a tensor 'layers\.2\.[a-z_.0-9]+' that {re.escape(a)} lacks",
                        refused(capsys, ["average", out, a, deep], out))
    message = refused(capsys, ["average", out, a, tmp_path / "a", wide], out)
    name, ours, theirs = re.fullmatch(rf"tensor '([^']+)' has shape (\(.*?\)) in {re.escape(a)} "
                                      rf"but (\(.*?\)) in {re.escape(wide)}", message).groups()
    assert ours == str(tuple(import_hf(a)[1][name].shape)) and theirs == str(tuple(import_hf(wide)[1][name].shape))
    assert refused(capsys, ["average", out, a, tmp_path / "theta"], out) == (
        f"{tmp_path / 'theta'} differs from {a} in config field rope_theta: 500000.0 vs 10000.0")
    assert refused(capsys, ["average", out, a, a, "--weights", "1"], out) == "1 weights for 2 models"
    assert refused(capsys, ["average", out, a, a, "--weights", "1", "-1"], out) == (
        "weights must be positive and finite, got 1.0 -1.0")
    assert refused(capsys, ["average", out, a, tmp_path / "missing"], out) == (
        f"checkpoint {tmp_path / 'missing'} does not exist")

    for name, content in (("tok_a", tokenizer_512.read_bytes()), ("tok_b", b"another tokenizer")):
        hf_folder(tmp_path / name, trained_like(CFG, seed=19), torch.float32, tokenizer=tokenizer_512)
        (tmp_path / name / "tokenizer.model").write_bytes(content)
    assert refused(capsys, ["average", out, tmp_path / "tok_a", tmp_path / "tok_b"], out) == (
        f"the tokenizer of {tmp_path / 'tok_b'} ({tmp_path / 'tok_b' / 'tokenizer.model'}) differs from that of "
        f"{tmp_path / 'tok_a'} ({tmp_path / 'tok_a' / 'tokenizer.model'})")


def test_a_model_of_several_dtypes_is_refused(tmp_path):
    tensors = {"norm.weight": torch.ones(4), "output.weight": torch.ones(4, 4, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match=r"^m holds tensors of several dtypes \(bfloat16, float32\); weight "
                                         r"arithmetic needs one$"):
        Weights(Path("m"), CFG, tensors, None).dtype
