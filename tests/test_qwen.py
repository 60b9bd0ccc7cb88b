"""model.py's Qwen2.5 against transformers' Qwen2ForCausalLM (the numerical oracle), its KV cache against full
recompute, and weight loading from sharded safetensors written by transformers itself."""

import json

import pytest
import torch

from model import KVCache, Qwen2ForCausalLM, QwenConfig, attention_mask
from weights import WeightsError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512)


def pair(tie, **over):
    """A random transformers Qwen2 and ours with the same weights."""
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(**{**TINY, **over}, tie_word_embeddings=tie, attn_implementation="eager")
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # transformers initializes biases to zero; make them matter
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0.0 if n.endswith("bias") else 1.0, 0.1)
    ours = Qwen2ForCausalLM(QwenConfig.from_official(hf_cfg.to_dict())).eval()
    sd = {k: v for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    ours.load_state_dict(sd, strict=True)
    return hf, ours


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_logits_equal_transformers(tie, T):
    hf, ours = pair(tie)
    ids = torch.randint(0, 128, (2, T))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.logits(ours(ids))
    assert (got - ref).abs().max() < 1e-5


def test_mha_without_gqa_and_other_theta():
    hf, ours = pair(True, num_key_value_heads=4, rope_theta=10000.0)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max() < 1e-5


def left_padded(lengths, T):
    valid = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, T - n:] = True
    return valid, (valid.cumsum(-1) - 1).clamp(min=0)


def test_batch_with_left_padding_equals_transformers():
    hf, ours = pair(False)
    T = 12
    valid, pos = left_padded([12, 5, 9], T)
    ids = torch.randint(0, 128, (3, T))
    with torch.no_grad():
        ref = hf(ids, attention_mask=valid.long(), position_ids=pos).logits
        got = ours.logits(ours(ids, positions=pos, mask=attention_mask(valid, 0, T)))
    assert (got - ref)[valid].abs().max() < 1e-5
    for b in range(3):  # and each row equals that prompt alone, unpadded
        n = int(valid[b].sum())
        with torch.no_grad():
            alone = ours.logits(ours(ids[b:b + 1, T - n:]))
        assert (got[b, T - n:] - alone[0]).abs().max() < 1e-5


def test_kv_cache_equals_full_recompute():
    """Prefill, one token at a time, then a block of 16 (as the 256 latent queries are appended)."""
    _, ours = pair(True)
    ids = torch.randint(0, 128, (2, 30))
    emb = ours.model.embed_tokens(ids).detach()
    with torch.no_grad():
        full = ours(inputs_embeds=emb)
        cache = KVCache(ours.config, batch=2, max_len=40, device="cpu", dtype=torch.float32)
        parts = [ours(inputs_embeds=emb[:, :10], cache=cache)]
        for i in range(10, 14):
            parts.append(ours(inputs_embeds=emb[:, i:i + 1], cache=cache))
        valid = torch.ones(2, 40, dtype=torch.bool)
        parts.append(ours(inputs_embeds=emb[:, 14:], cache=cache, mask=attention_mask(valid, 14, 16)))
    assert cache.length == 30
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_kv_cache_with_left_padding():
    _, ours = pair(False)
    T = 10
    valid, pos = left_padded([10, 4], T)
    ids = torch.randint(0, 128, (2, T + 3))
    full_valid = torch.cat([valid, torch.ones(2, 3, dtype=torch.bool)], 1)
    full_pos = (full_valid.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = ours(ids, positions=full_pos, mask=attention_mask(full_valid, 0, T + 3))
        cache = KVCache(ours.config, batch=2, max_len=T + 3, device="cpu", dtype=torch.float32)
        ours(ids[:, :T], positions=pos, mask=attention_mask(full_valid, 0, T), cache=cache)
        steps = [ours(ids[:, i:i + 1], positions=full_pos[:, i:i + 1], mask=attention_mask(full_valid, i, 1), cache=cache)
                 for i in range(T, T + 3)]
    assert (torch.cat(steps, 1) - full[:, T:]).abs().max() < 1e-5


def test_bfloat16_runs_and_tracks_float32():
    _, ours = pair(True)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        ref = ours(ids)
        got = ours.to(torch.bfloat16)(ids)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() < 0.1


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def saved(request, tmp_path):
    """transformers writes a sharded safetensors checkpoint (index + shards): the official on-disk format."""
    hf, _ = pair(request.param)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    return hf, tmp_path


def test_sharded_checkpoint_loads_exactly(saved):
    hf, path = saved
    ours = Qwen2ForCausalLM.from_pretrained(path)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, hf.state_dict()[k]), k
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max() < 1e-5
    assert Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).model.norm.weight.dtype == torch.bfloat16


def rewrite_shard(path, edit):
    from safetensors.torch import load_file, save_file
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"]["model.norm.weight"]
    sd = load_file(shard)
    edit(sd)
    save_file(sd, shard)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("model.norm.weight"), "missing .*model.norm.weight"),
    (lambda sd: sd.update(bogus=torch.zeros(1)), "unexpected .*bogus"),
    (lambda sd: sd.update({"model.norm.weight": torch.zeros(3)}), r"wrong shape .*model.norm.weight: file \(3,\) vs model \(64,\)"),
])
def test_mismatched_keys_are_one_clear_error(saved, edit, message):
    _, path = saved
    if "bogus" in message:  # unexpected keys only count inside the LM's own prefixes
        rewrite_shard(path, lambda sd: sd.update({"model.layers.9.bogus": torch.zeros(1)}))
        message = "unexpected .*model.layers.9.bogus"
    else:
        rewrite_shard(path, edit)
    with pytest.raises(WeightsError, match=message):
        Qwen2ForCausalLM.from_pretrained(path)


def test_truncated_file_names_the_file(saved):
    _, path = saved
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(WeightsError, match=f"{shard.name} is corrupt or truncated"):
        Qwen2ForCausalLM.from_pretrained(path)


def test_missing_folder_and_bad_repo_id(tmp_path):
    with pytest.raises(WeightsError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text("{}")
        Qwen2ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="neither a local folder nor a Hub repo id"):
        Qwen2ForCausalLM.from_pretrained(str(tmp_path / "does" / "not" / "exist"))


def test_config_ignores_unknown_fields_and_presets():
    from model import QWEN_PRESETS
    cfg = QwenConfig.from_official({"hidden_size": 64, "num_attention_heads": 4, "mm_hidden_size": 1152, "patch_size": 2})
    assert cfg.hidden_size == 64 and cfg.head_dim == 16
    assert QWEN_PRESETS["qwen2.5-1.5b"].head_dim == 128 and QWEN_PRESETS["qwen2.5-7b"].head_dim == 128
    assert not QWEN_PRESETS["qwen2.5-7b"].tie_word_embeddings
