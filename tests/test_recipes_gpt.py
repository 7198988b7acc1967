"""Tests of the GPT recipe (recipes/gpt.py, issue 20 part 3).

References: a NumPy float64 GPT-2 forward pass written from the architecture (not from the
model's code), Hugging Face ``transformers``' GPT2LMHeadModel on the same weights (where torch
is installed), tensors written with the ``safetensors`` package, a tokenizer trained in two
fresh processes, windows and splits checked by hand.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from recipes.engine import workflow  # noqa: E402
from recipes.text import gpt, gpt_data, gpt_task  # noqa: E402

TINY = dict(vocab_size=37, n_positions=12, n_embd=16, n_layer=2, n_head=4)


def hf_tensors(rng, vocab_size, n_positions, n_embd, n_layer, n_head):
    """Random weights under Hugging Face GPT-2 names, Conv1D layout (in, out)."""
    d = n_embd
    tensors = {"wte.weight": rng.normal(0, 0.3, (vocab_size, d)),
               "wpe.weight": rng.normal(0, 0.3, (n_positions, d)),
               "ln_f.weight": 1 + rng.normal(0, 0.1, d), "ln_f.bias": rng.normal(0, 0.1, d)}
    for i in range(n_layer):
        for name, shape in (("attn.c_attn", (d, 3 * d)), ("attn.c_proj", (d, d)),
                            ("mlp.c_fc", (d, 4 * d)), ("mlp.c_proj", (4 * d, d))):
            tensors[f"h.{i}.{name}.weight"] = rng.normal(0, 0.3, shape)
            tensors[f"h.{i}.{name}.bias"] = rng.normal(0, 0.1, shape[1])
        for name in ("ln_1", "ln_2"):
            tensors[f"h.{i}.{name}.weight"] = 1 + rng.normal(0, 0.1, d)
            tensors[f"h.{i}.{name}.bias"] = rng.normal(0, 0.1, d)
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def numpy_gpt2(t, tokens, n_layer, n_head, eps=1e-5):
    """GPT-2's forward pass in float64 from its definition (Radford et al. 2019, pre-norm)."""
    t = {k: v.astype(np.float64) for k, v in t.items()}

    def norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

    def linear(x, name):
        return x @ t[name + ".weight"] + t[name + ".bias"]

    length = tokens.shape[-1]
    x = t["wte.weight"][tokens] + t["wpe.weight"][:length]
    for i in range(n_layer):
        h = norm(x, f"h.{i}.ln_1")
        q, k, v = np.split(linear(h, f"h.{i}.attn.c_attn"), 3, axis=-1)
        split = lambda a: a.reshape(*a.shape[:-1], n_head, -1).swapaxes(-2, -3)  # (B, H, T, hd)
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((length, length))) > 0, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = (weights @ v).swapaxes(-2, -3).reshape(x.shape)
        x = x + linear(attended, f"h.{i}.attn.c_proj")
        h = linear(norm(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        x = x + linear(h, f"h.{i}.mlp.c_proj")
    return norm(x, "ln_f") @ t["wte.weight"].T


def load_tiny(path):
    cfg = gpt.hf_gpt2_config(str(path))
    graphdef, params = nnx.split(gpt.GPT(cfg, nnx.Rngs(0)), nnx.Param)
    loaded = gpt.load_hf_gpt2(str(path), nnx.to_pure_dict(params))
    forward = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens))  # one compile, not per op
    return cfg, lambda tokens: forward(loaded, tokens), loaded


def test_forward_equals_a_numpy_float64_gpt2_block_stack(tmp_path):
    from safetensors.numpy import save_file

    tensors = hf_tensors(np.random.default_rng(0), **TINY)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"n_head": TINY["n_head"]}))
    cfg, model, _ = load_tiny(tmp_path / "model.safetensors")
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == tuple(TINY.values())
    tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], (3, TINY["n_positions"]))
    expected = numpy_gpt2(tensors, tokens, TINY["n_layer"], TINY["n_head"])
    got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Causal: changing the last token changes only the last position's logits.
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % TINY["vocab_size"]
    other = np.asarray(model(jnp.asarray(changed, jnp.int32)))
    np.testing.assert_array_equal(other[:, :-1], got[:, :-1])


def test_safetensors_import_and_export_round_trip(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = hf_tensors(np.random.default_rng(2), **TINY)
    # A GPT2LMHeadModel file: "transformer." prefix, the tied head and the causal buffers.
    written = {"transformer." + k: v for k, v in tensors.items()}
    written["lm_head.weight"] = tensors["wte.weight"]
    written["transformer.h.0.attn.bias"] = np.ones((1, 1, 12, 12), np.float32)
    save_file(written, str(tmp_path / "model.safetensors"))
    cfg, _, loaded = load_tiny(tmp_path / "model.safetensors")
    assert cfg.n_head == 1  # no config.json: n_embd // 64, at least 1
    np.testing.assert_array_equal(loaded["h"][1]["attn"]["c_attn"]["kernel"],
                                  tensors["h.1.attn.c_attn.weight"])
    np.testing.assert_array_equal(loaded["h"][0]["ln_2"]["scale"], tensors["h.0.ln_2.weight"])
    np.testing.assert_array_equal(loaded["wpe"]["embedding"], tensors["wpe.weight"])
    gpt.save_hf_gpt2(loaded, str(tmp_path / "out.safetensors"))
    back = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_bad_checkpoints_name_the_tensor(tmp_path):
    from safetensors.numpy import save_file

    tensors = hf_tensors(np.random.default_rng(3), **TINY)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = gpt.hf_gpt2_config(str(tmp_path / "model.safetensors"))
    like = nnx.to_pure_dict(nnx.state(gpt.GPT(cfg, nnx.Rngs(0)), nnx.Param))
    bad = dict(tensors, **{"h.1.mlp.c_fc.weight": tensors["h.1.mlp.c_fc.weight"].T.copy()})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(64, 16\).*\(16, 64\)"):
        gpt.load_hf_gpt2(str(tmp_path / "bad.safetensors"), like)
    missing = {k: v for k, v in tensors.items() if k != "ln_f.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="no tensor for ln_f/bias"):
        gpt.load_hf_gpt2(str(tmp_path / "missing.safetensors"), like)


@pytest.mark.skipif(not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")),
                    reason="needs torch and transformers (run in a side environment)")
def test_imported_gpt2_gives_transformers_logits(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=24, n_embd=32, n_layer=3, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # weights large enough for logits of several units, non-trivial norms
        for name, p in reference.named_parameters():
            p.copy_(0.3 * torch.randn_like(p) + (1.0 if "ln_" in name and "weight" in name else 0.0))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    tokens = np.random.default_rng(4).integers(0, 97, (2, 24))
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens)).logits.double().numpy()
    cfg, model, _ = load_tiny(tmp_path / "model.safetensors")
    assert cfg.n_head == 4 and cfg.n_layer == 3
    got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    error = float(np.abs(got - expected).max())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}: GPT2LMHeadModel "
          f"(3 layers, d 32, 4 heads, vocab 97, random weights) logits on 2 x 24 tokens, max |jax "
          f"- transformers| = {error:.3g} (logits up to {np.abs(expected).max():.3g})")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


BPE_SCRIPT = """
import sys; sys.path.insert(0, {root!r})
from recipes.text import gpt_data
texts = gpt_data.stdlib_modules()["train"][:25]
print(gpt_data.train_bpe(texts, 700).to_str())
"""


def test_bpe_vocabulary_is_the_same_in_fresh_processes():
    runs = [subprocess.run([sys.executable, "-c", BPE_SCRIPT.format(root=REPO_ROOT)], check=True,
                           capture_output=True, text=True).stdout for _ in range(2)]
    vocabularies = [json.loads(run)["model"]["vocab"] for run in runs]
    assert len(vocabularies[0]) == 700 and vocabularies[0]["<|endoftext|>"] == 0
    assert vocabularies[0] == vocabularies[1]
    assert json.loads(runs[0])["model"]["merges"] == json.loads(runs[1])["model"]["merges"]


def test_stdlib_split_and_windows_by_hand():
    import glob
    import sysconfig

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    splits = gpt_data.stdlib_modules()
    assert len(splits["valid"]) == len(files[::10]) and len(splits["train"]) == len(files) - len(files[::10])
    with open(files[10], encoding="utf-8", errors="replace") as f:
        assert splits["valid"][1] == f.read()  # the 11th module is held out
    stream = np.arange(10, dtype=np.int32)
    np.testing.assert_array_equal(gpt_data.eval_windows(stream, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    windows = gpt_data.random_windows(stream, 5, 3, 0)
    assert all(list(w) == list(range(w[0], w[0] + 3)) for w in windows)
    np.testing.assert_array_equal(windows, gpt_data.random_windows(stream, 5, 3, 0))
    with pytest.raises(ValueError, match="shorter than one window"):
        gpt_data.eval_windows(stream, 11)


@pytest.mark.slow
def test_smoke_run_and_resumed_run_equal_the_uninterrupted_one(tmp_path, capsys):
    export = importlib.util.find_spec("jax2onnx") is not None
    whole = gpt_task.main("gpt", "", "", ["--smoke", "--workdir", str(tmp_path / "whole"),
                                         *(["--export-onnx", str(tmp_path / "m.onnx")] if export else [])])
    saved = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert saved == json.loads(json.dumps(whole))
    assert saved["metric"] == "perplexity" and saved["exactly_nm_sparse"] is True
    assert saved["steps"] == {"dense": 6, "retrain": 4, "control": 4}  # control on by default
    assert saved["control"] > 1.0  # a perplexity
    one_shot = saved["one_shot_perplexity"]
    assert sorted(one_shot) == ["magnitude", "sparsegpt", "wanda"]
    assert saved["one_shot"] == min(one_shot.values()) == one_shot[saved["one_shot_method"]]
    for name in ("metrics.jsonl", "curves.png", "sparsity_report.txt", "tokenizer.json",
                 "sparse_model.safetensors", "config.json"):
        assert (tmp_path / "whole" / name).exists(), name
    report = (tmp_path / "whole" / "sparsity_report.txt").read_text()
    assert "every pruned leaf 2:4: yes" in report and "wte/embedding" in report
    printed = capsys.readouterr().out
    assert "| gpt | stdlib | one-shot sparsegpt | - |" in printed
    if export:
        from sparse_jax import inspect as sparse_inspect

        checks = sparse_inspect.inspect_onnx(tmp_path / "m.onnx")
        assert len(checks) == 8 and all(c.is_24 for c in checks)
    config = gpt_task.smoke_config(gpt_task.builtin_config())
    with pytest.raises(workflow.Interrupted):  # after retraining step 3 (checkpointed), of 4
        gpt_task.train_and_evaluate(config.replace(interrupt_after_steps=9), str(tmp_path / "resumed"))
    resumed = gpt_task.train_and_evaluate(config, str(tmp_path / "resumed"), resume=True)
    for key in ("dense", "one_shot", "sparse", "one_shot_perplexity"):
        assert resumed[key] == whole[key], key


@pytest.mark.slow
def test_srste_smoke_ends_exactly_2_4_after_dense_plus_retrain_steps(tmp_path):
    from safetensors.numpy import load_file

    results = gpt_task.main("gpt", "", "", ["--smoke", "--method", "sr-ste", "--no-progress",
                                           "--workdir", str(tmp_path)])
    config = gpt_task.smoke_config(gpt_task.builtin_config())
    total = config.num_train_steps + config.retrain_steps  # SR-STE: one phase as long as both
    assert results["steps"] == {"sr-ste": total, "control": total}
    assert results["dense"] is None and results["one_shot"] is None
    assert results["one_shot_method"] is None and results["exactly_nm_sparse"] is True
    assert results["sparse"] > 1.0 and results["control"] > 1.0  # perplexities
    # The exported model, read back with NumPy: every pruned kernel (Conv1D, (in, out)) keeps
    # at most 2 of every 4 consecutive inputs.
    weights = load_file(str(tmp_path / "sparse_model.safetensors"))
    kernels = [k for k in weights if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight",
                                                 "mlp.c_fc.weight", "mlp.c_proj.weight"))]
    assert len(kernels) == 4 * config.n_layer
    for name in kernels:
        w = weights[name]
        groups = (w.reshape(w.shape[0] // 4, 4, w.shape[1]) != 0).sum(axis=1)
        assert groups.max() <= 2, name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["phase"] == "sr-ste") == total
    assert all(r.get("mask_flip_fraction") is not None
               for r in records if r["phase"] == "sr-ste" and r["split"] == "train")
