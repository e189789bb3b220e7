#!/usr/bin/env python3
"""Generate reference fixtures for Roundhouse (Qwen3-Next / AutoRound int4-mixed).

For every case this builds a tiny random Qwen3-Next model with transformers' own
Qwen3NextConfig / Qwen3NextForCausalLM (float32, eager attention) and writes

    tests/fixtures/reference/<case>/float/             save_pretrained output, BF16 weights
    tests/fixtures/reference/<case>/quant/             AutoRound RTN "int4-mixed" checkpoint
                                                       (auto_round:auto_gptq packing), BF16 non-quantized
    tests/fixtures/reference/<case>/golden.safetensors ids, logits_float, logits_quant

Golden logits are computed in float32 by transformers from the in-memory model:
  logits_float: weights = the BF16 values stored in float/model.safetensors
  logits_quant: every quantized Linear replaced by the exact float32 dequantization of
                quant/model.safetensors, W[n,k] = scales[k/G,n] * (q[k,n] - (zero_stored+1)),
                all other tensors = the BF16 values stored in quant/model.safetensors.

Deterministic: fixed seeds, no network. Rerun with `python tests/reference/make_fixtures.py`.
"""

import copy
import json
import os
import shutil
import sys
import tempfile
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transformers
from transformers import PreTrainedTokenizerFast, Qwen3NextConfig, Qwen3NextForCausalLM

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_ROOT = os.path.join(REPO, "tests", "fixtures", "reference")
TOKENIZER_CANDIDATES = [
    "/work/shared/fixtures/qwen3-tokenizer.json",
    os.path.join(REPO, "fixtures", "qwen3-tokenizer.json"),
]
SEQ_LEN = 24
PREFIX_LEN = 16  # continuation check: prefill 16, then the remaining 8 in one call

CASES = {
    # group size 32; both layer types twice; value heads != key heads; dk != dv.
    # in_proj_ba has out = 2*nv = 8 (not a multiple of 32), so auto-round keeps it 16-bit
    # (it shows up in extra_config as {"bits": 16, "data_type": "fp"}).
    "gs32": dict(
        group_size=32,
        seed=1234,
        legacy_config=False,  # config.json exactly as transformers 5.x writes it (rope_parameters, layer_types)
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,  # unused (no dense MLP layers)
            num_hidden_layers=4,
            full_attention_interval=2,  # layers 0,2 linear; 1,3 full
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            partial_rotary_factor=0.25,  # rotary dim 8
            rope_theta=1.0e6,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=32,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    # group size 128; layers 0,1,2 linear, 3 full (interval 4, like the real model).
    # nv = 16 so that in_proj_ba (out = 2*nv = 32) is quantized (W8) like in the real checkpoint.
    "gs128": dict(
        group_size=128,
        seed=5678,
        legacy_config=True,  # config.json rewritten in the style of the real Qwen/Intel release
        config=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,  # unused
            num_hidden_layers=4,
            full_attention_interval=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,  # num_heads*head_dim = 256 = o_proj in (2 groups of 128)
            partial_rotary_factor=0.25,  # rotary dim 16
            rope_theta=1.0e7,
            linear_num_key_heads=2,
            linear_num_value_heads=16,
            linear_key_head_dim=64,
            linear_value_head_dim=8,  # value_dim = 128 = out_proj in
            linear_conv_kernel_dim=4,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
}


# ----------------------------------------------------------------------------------------------
# model construction


def make_config(c):
    c = dict(c)
    interval = c.pop("full_attention_interval")
    rope_theta = c.pop("rope_theta")
    prf = c.pop("partial_rotary_factor")
    cfg = Qwen3NextConfig(
        **c,
        full_attention_interval=interval,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": prf},
    )
    cfg._attn_implementation = "eager"
    return cfg


def bf16_round_(t):
    t.copy_(t.to(torch.bfloat16).to(t.dtype))


@torch.no_grad()
def init_weights(model, cfg, gen):
    """Re-initialise with larger weights than the default (std 0.02), so logits span several units."""

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = tuple(p.shape)
        if name.endswith("embed_tokens.weight"):
            v = normal(shape, 1.0)
        elif name.endswith("lm_head.weight"):
            v = normal(shape, 2.0 / shape[1] ** 0.5)
        elif name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]
            v = normal(shape, 1.0 / shape[2] ** 0.5)
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            v = normal(shape, 1.0 / shape[2] ** 0.5)
        elif name.endswith("linear_attn.conv1d.weight"):  # [C, 1, K]
            v = normal(shape, 1.0 / shape[2] ** 0.5)
        elif name.endswith("linear_attn.A_log"):
            v = torch.log(uniform(shape, 0.05, 1.5))
        elif name.endswith("linear_attn.dt_bias"):
            v = uniform(shape, -2.0, 0.5)
        elif name.endswith("linear_attn.norm.weight"):  # gated RMSNorm, plain scale (neutral 1)
            v = uniform(shape, 0.6, 1.4)
        elif name.endswith("norm.weight"):  # zero-centred RMSNorms (1 + w), neutral 0
            v = uniform(shape, -0.4, 0.4)
        elif p.dim() == 2:  # every other Linear weight (incl. router mlp.gate, shared_expert_gate)
            v = normal(shape, 1.0 / shape[1] ** 0.5)
        else:
            raise RuntimeError(f"unhandled parameter {name} {shape}")
        p.copy_(v)
        bf16_round_(p)  # the model holds exactly the BF16 checkpoint values


# ----------------------------------------------------------------------------------------------
# checkpoints


def per_expert_state_dict(model):
    """State dict with routed experts split per expert, as real checkpoints store them."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            prefix = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v.clone()
    return out


def legacy_config_json(path, case_cfg):
    """Rewrite config.json in the style of the real release (transformers 4.57 era):
    top-level rope_theta / partial_rotary_factor / full_attention_interval / rope_scaling,
    no rope_parameters and no layer_types, torch_dtype instead of dtype."""
    with open(path) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters")
    c.pop("layer_types")
    c["rope_theta"] = rp["rope_theta"]
    c["partial_rotary_factor"] = rp["partial_rotary_factor"]
    c["rope_scaling"] = None
    c["full_attention_interval"] = case_cfg["full_attention_interval"]
    c["torch_dtype"] = c.pop("dtype", "bfloat16")
    with open(path, "w") as f:
        json.dump(dict(sorted(c.items())), f, indent=2)
        f.write("\n")


def save_float(model, cfg, out_dir, case):
    os.makedirs(out_dir, exist_ok=True)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    m16.save_pretrained(out_dir)
    del m16
    st = os.path.join(out_dir, "model.safetensors")
    assert os.path.exists(st), os.listdir(out_dir)
    sd = load_file(st)
    want = {k: v.to(torch.bfloat16) for k, v in per_expert_state_dict(model).items()}
    names_ok = set(sd) == set(want)
    if not names_ok:
        # transformers did not write per-expert names: write the file ourselves
        print(f"  [{case}] save_pretrained wrote non per-expert names; rewriting model.safetensors")
        save_file(dict(sorted(want.items())), st, metadata={"format": "pt"})
        sd = load_file(st)
    for k, v in want.items():
        assert sd[k].dtype == torch.bfloat16, (k, sd[k].dtype)
        assert torch.equal(sd[k], v), k
    if CASES[case]["legacy_config"]:
        legacy_config_json(os.path.join(out_dir, "config.json"), CASES[case]["config"])
    with open(os.path.join(out_dir, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen3_next"
    return sd


def find_tokenizer():
    """AutoRound wants a tokenizer object; RTN (iters=0) never tokenizes the dataset, so any Qwen3
    tokenizer.json will do (its ids exceed the tiny vocab, which does not matter here)."""
    for p in TOKENIZER_CANDIDATES:
        if os.path.exists(p):
            return PreTrainedTokenizerFast(tokenizer_file=p)
    zst = os.path.join(REPO, "fixtures", "qwen3-tokenizer.json.zst")
    if os.path.exists(zst) and shutil.which("zstd"):
        import subprocess

        tmp = os.path.join(tempfile.mkdtemp(prefix="tok_"), "tokenizer.json")
        subprocess.run(["zstd", "-q", "-d", zst, "-o", tmp], check=True)
        return PreTrainedTokenizerFast(tokenizer_file=tmp)
    raise FileNotFoundError(f"need a Qwen3 tokenizer.json at one of {TOKENIZER_CANDIDATES} (or {zst} + zstd)")


def layer_config_int4_mixed(model):
    """Intel "int4-mixed": routed experts W4 (global bits), every other Linear W8.
    The router (mlp.gate) and mlp.shared_expert_gate are kept 16-bit by auto-round itself."""
    lc = {}
    for n, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or n == "lm_head":
            continue
        if n.endswith("mlp.shared_expert_gate") or n.endswith("mlp.gate"):
            continue
        if ".mlp.experts." in n:
            continue
        lc[n] = {"bits": 8}
    return lc


def build_model(spec):
    cfg = make_config(spec["config"])
    model = Qwen3NextForCausalLM(cfg).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    # auto-round monkey-patches transformers' MoE class when it loads a quantized model; the goldens must
    # come from transformers' own classes, so auto-round only ever runs in child processes.
    from transformers.models.qwen3_next import modeling_qwen3_next as mq

    assert type(model.model.layers[0].mlp).__module__ == mq.__name__, type(model.model.layers[0].mlp)
    assert "auto_round" not in sys.modules or os.environ.get("RH_CHILD") == "1"
    return cfg, model


def run_child(*args):
    import subprocess

    env = dict(os.environ, RH_CHILD="1")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("  "):
            print(line)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-5000:] + r.stderr[-20000:])
        raise RuntimeError(f"child {args} failed with {r.returncode}")


def child_quantize(case):
    """Child process: rebuild the float model from float/ and run auto-round RTN on it."""
    spec = CASES[case]
    out_dir = os.path.join(OUT_ROOT, case)
    _, model = build_model(spec)
    fsd = load_file(os.path.join(out_dir, "float", "model.safetensors"))
    fuse_into_model(model, {k: v.float() for k, v in fsd.items()})
    quantize_autoround(model, os.path.join(out_dir, "quant"), spec["group_size"], spec["config"], spec["legacy_config"])


def child_ar_check(case):
    """Child process: auto-round's own inference on quant/ vs the golden logits_quant."""
    out_dir = os.path.join(OUT_ROOT, case)
    g = load_file(os.path.join(out_dir, "golden.safetensors"))
    autoround_inference_check(os.path.join(out_dir, "quant"), g["ids"], g["logits_quant"])


def quantize_autoround(model, out_dir, group_size, case_cfg, legacy):
    from auto_round import AutoRound

    tok = find_tokenizer()
    m = model  # auto-round mutates (unfuses / replaces) the model it is given; this is a throwaway copy
    lc = layer_config_int4_mixed(m)
    tmp = tempfile.mkdtemp(prefix="ar_")
    try:
        ar = AutoRound(
            m,
            tok,
            bits=4,
            group_size=group_size,
            sym=True,
            iters=0,
            disable_opt_rtn=True,
            layer_config=lc,
            dataset=["The quick brown fox jumps over the lazy dog."] * 4,
            seqlen=16,
            nsamples=4,
        )
        _, saved = ar.quantize_and_save(tmp, format="auto_round")
        os.makedirs(out_dir, exist_ok=True)
        for fn in ["config.json", "quantization_config.json", "generation_config.json", "model.safetensors"]:
            src = os.path.join(saved, fn)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, fn))
        # tokenizer files are dropped on purpose (6 MB, not part of the model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # Unquantized tensors: auto-round writes float32 for a float32 model; Intel's release has BF16.
    st = os.path.join(out_dir, "model.safetensors")
    sd = load_file(st)
    conv = {}
    for k, v in sd.items():
        if v.dtype == torch.float32:
            b = v.to(torch.bfloat16)
            assert torch.equal(b.float(), v), f"{k} is not BF16-exact"
            conv[k] = b
        else:
            conv[k] = v
    save_file(dict(sorted(conv.items())), st, metadata={"format": "pt"})
    cpath = os.path.join(out_dir, "config.json")
    with open(cpath) as f:
        c = json.load(f)
    c["dtype"] = "bfloat16"
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")
    if legacy:
        legacy_config_json(cpath, case_cfg)


# ----------------------------------------------------------------------------------------------
# dequantization (auto_round:auto_gptq, GPTQ v1 zero-1 convention)


def unpack_rows(packed, bits):
    """int32 [R, C] -> int64 [R*32/bits, C], LSB-first along dim 0."""
    pf = 32 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    q = (p.unsqueeze(1) >> shifts.view(1, pf, 1)) & mask  # [R, pf, C]
    return q.reshape(-1, packed.shape[1])


def unpack_cols(packed, bits):
    """int32 [R, C] -> int64 [R, C*32/bits], LSB-first along dim 1."""
    pf = 32 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    q = (p.unsqueeze(2) >> shifts.view(1, 1, pf)) & mask  # [R, C, pf]
    return q.reshape(packed.shape[0], -1)


def dequant(qweight, qzeros, scales, bits, group_size):
    q = unpack_rows(qweight, bits)  # [in, out]
    z = unpack_cols(qzeros, bits) + 1  # [in/G, out]
    s = scales.to(torch.float32)  # [in/G, out]
    k = q.shape[0]
    g = torch.arange(k) // group_size
    w = s[g] * (q - z[g]).to(torch.float32)  # [in, out]
    return w.t().contiguous()  # [out, in]


def module_bits(name, qcfg):
    ex = qcfg.get("extra_config", {})
    if name in ex:
        return ex[name].get("bits", qcfg["bits"]), ex[name].get("group_size", qcfg["group_size"])
    return qcfg["bits"], qcfg["group_size"]


def quant_state_dict_to_float(qsd, qcfg):
    """Float32 per-expert state dict from the quant checkpoint (exact dequantization)."""
    out = {}
    stats = {}
    for k, v in qsd.items():
        if k.endswith(".qweight"):
            mod = k[: -len(".qweight")]
            bits, gs = module_bits(mod, qcfg)
            qz = qsd[mod + ".qzeros"]
            zs = unpack_cols(qz, bits)
            assert torch.all(zs == (1 << (bits - 1)) - 1), f"{mod}: unexpected zero point"
            w = dequant(v, qz, qsd[mod + ".scales"], bits, gs)
            out[mod + ".weight"] = w
            stats[bits] = stats.get(bits, 0) + 1
        elif k.endswith(".qzeros") or k.endswith(".scales"):
            continue
        else:
            out[k] = v.to(torch.float32)
    return out, stats


def fuse_into_model(model, sd):
    """Load a per-expert state dict into a transformers 5.x model (fused experts)."""
    fused = {}
    ms = model.state_dict()
    for k in ms:
        if k.endswith("mlp.experts.gate_up_proj"):
            prefix = k[: -len("gate_up_proj")]
            E = ms[k].shape[0]
            fused[k] = torch.stack(
                [torch.cat([sd[f"{prefix}{e}.gate_proj.weight"], sd[f"{prefix}{e}.up_proj.weight"]], 0) for e in range(E)]
            )
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            E = ms[k].shape[0]
            fused[k] = torch.stack([sd[f"{prefix}{e}.down_proj.weight"] for e in range(E)])
        else:
            fused[k] = sd[k]
    used = set()
    for k in fused:
        if "mlp.experts." in k:
            prefix = k.rsplit(".", 1)[0] + "."
            used |= {x for x in sd if x.startswith(prefix)}
        else:
            used.add(k)
    extra = set(sd) - used
    assert not extra, f"unused tensors: {sorted(extra)[:5]}"
    for k, v in fused.items():
        assert tuple(v.shape) == tuple(ms[k].shape), (k, v.shape, ms[k].shape)
    model.load_state_dict({k: v.to(torch.float32) for k, v in fused.items()}, strict=True)


# ----------------------------------------------------------------------------------------------
# forward passes


@torch.no_grad()
def full_logits(model, ids):
    return model(input_ids=ids.view(1, -1), use_cache=False).logits[0].float()


@torch.no_grad()
def stepwise_logits(model, ids):
    out, pkv = [], None
    for t in range(ids.numel()):
        r = model(input_ids=ids[t : t + 1].view(1, 1), past_key_values=pkv, use_cache=True)
        pkv = r.past_key_values
        out.append(r.logits[0, -1].float())
    return torch.stack(out)


@torch.no_grad()
def prefix_then_rest_logits(model, ids, n):
    r1 = model(input_ids=ids[:n].view(1, -1), use_cache=True)
    r2 = model(input_ids=ids[n:].view(1, -1), past_key_values=r1.past_key_values, use_cache=True)
    return torch.cat([r1.logits[0], r2.logits[0]]).float()


def rel_err(a, b):
    rng = (b.max() - b.min()).item()
    return (a - b).abs().max().item() / rng


def check_consistency(tag, model, ids, ref):
    step = stepwise_logits(model, ids)
    e1 = rel_err(step, ref)
    cont = prefix_then_rest_logits(model, ids, PREFIX_LEN)
    e2 = rel_err(cont, ref)
    top = (step.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"  {tag}: token-by-token vs full: max|diff|/range = {e1:.2e} (top-1 agree {top:.3f}); "
          f"prefill {PREFIX_LEN} + {ids.numel() - PREFIX_LEN} vs full: {e2:.2e}")
    assert e1 < 1e-4, f"{tag}: cached decode disagrees with full forward ({e1})"
    assert e2 < 1e-4, f"{tag}: continuation prefill disagrees with full forward ({e2})"


def autoround_inference_check(quant_dir, ids, ref):
    """Sanity: auto-round's own CPU inference on the saved quant dir vs our exact dequantization."""
    try:
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = AutoModelForCausalLM.from_pretrained(quant_dir, dtype=torch.float32, attn_implementation="eager")
        m.eval()
        lg = full_logits(m, ids)
        e = (lg - ref).abs().max().item()
        top = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"  auto-round inference vs exact dequant: max|diff| = {e:.3f} "
              f"(rel {e / (ref.max() - ref.min()).item():.2e}), top-1 agree {top:.3f}")
    except Exception as ex:  # informational only
        print(f"  auto-round inference check skipped: {type(ex).__name__}: {ex}")


# ----------------------------------------------------------------------------------------------


def run_case(case, spec):
    print(f"== {case}")
    out_dir = os.path.join(OUT_ROOT, case)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    cfg, model = build_model(spec)
    init_weights(model, cfg, gen)
    print(f"  layer_types={cfg.layer_types} rope={cfg.rope_parameters}")

    ids = torch.randint(0, cfg.vocab_size, (SEQ_LEN,), generator=gen, dtype=torch.int64)

    # ---- float checkpoint + golden
    fsd = save_float(model, cfg, os.path.join(out_dir, "float"), case)
    fuse_into_model(model, {k: v.float() for k, v in fsd.items()})  # identical values (already BF16-rounded)
    logits_float = full_logits(model, ids)
    check_consistency("float", model, ids, logits_float)

    # legacy config must parse to the same model config
    with open(os.path.join(out_dir, "float", "config.json")) as f:
        c2 = Qwen3NextConfig.from_dict(json.load(f))
    assert c2.layer_types == cfg.layer_types, (c2.layer_types, cfg.layer_types)
    assert c2.rope_parameters["rope_theta"] == cfg.rope_parameters["rope_theta"]
    assert c2.rope_parameters["partial_rotary_factor"] == cfg.rope_parameters["partial_rotary_factor"]

    # ---- quant checkpoint + golden
    qdir = os.path.join(out_dir, "quant")
    run_child("--child-quantize", case)
    qsd = load_file(os.path.join(qdir, "model.safetensors"))
    with open(os.path.join(qdir, "config.json")) as f:
        qcfg = json.load(f)["quantization_config"]
    assert qcfg["packing_format"] == "auto_round:auto_gptq" and qcfg["sym"] and qcfg["group_size"] == spec["group_size"]
    deq, stats = quant_state_dict_to_float(qsd, qcfg)
    print(f"  quantized modules by bits: {dict(sorted(stats.items()))}; "
          f"16-bit extra_config entries: {sum(1 for v in qcfg['extra_config'].values() if v.get('bits', 0) >= 16)}")
    # every expert W4, everything else that got quantized W8
    for k in qsd:
        if k.endswith(".qweight"):
            b = module_bits(k[: -len(".qweight")], qcfg)[0]
            assert b == (4 if ".mlp.experts." in k else 8), (k, b)
    # quantization error vs the float weights (sanity)
    worst = max((deq[k] - fsd[k].float()).abs().max().item() / fsd[k].float().abs().max().item()
                for k in deq if k in fsd and k.endswith("proj.weight"))
    print(f"  max |W_deq - W| / max|W| over projections: {worst:.3f}")
    qmodel = copy.deepcopy(model)
    fuse_into_model(qmodel, deq)
    logits_quant = full_logits(qmodel, ids)
    check_consistency("quant", qmodel, ids, logits_quant)

    d = (logits_quant - logits_float).abs().max().item()
    top = (logits_quant.argmax(-1) == logits_float.argmax(-1)).float().mean().item()
    print(f"  logits_float range [{logits_float.min():.3f}, {logits_float.max():.3f}], "
          f"logits_quant range [{logits_quant.min():.3f}, {logits_quant.max():.3f}], "
          f"max|quant-float| = {d:.3f}, top-1 agree {top:.3f}")

    save_file(
        {
            "ids": ids.contiguous(),
            "logits_float": logits_float.contiguous(),
            "logits_quant": logits_quant.contiguous(),
        },
        os.path.join(out_dir, "golden.safetensors"),
        # one key only: safetensors writes metadata keys in hash order, which breaks byte-determinism
        metadata={
            "info": json.dumps(
                {
                    "case": case,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "note": "float32 transformers forward over ids (batch 1, positions 0..T-1, no cache)",
                },
                sort_keys=True,
            )
        },
    )
    run_child("--child-ar-check", case)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out_dir) for f in fs)
    print(f"  wrote {out_dir} ({total / 1e6:.2f} MB)")


def main():
    from importlib.metadata import version

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "--child-quantize":
        return child_quantize(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--child-ar-check":
        return child_ar_check(sys.argv[2])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, auto-round {version('auto-round')}")
    cases = sys.argv[1:] or list(CASES)
    for case in cases:
        run_case(case, CASES[case])


if __name__ == "__main__":
    main()
