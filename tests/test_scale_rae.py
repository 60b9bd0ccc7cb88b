"""The unified model: official key names, config round trip, the embedding splice, the training loss, and the
KV-cache generation loop against the official full-recompute loop."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dit
from dit import DiTConfig
from model import SCALE_RAE_PRESETS, ScaleRAE, ScaleRAEConfig, chunked_cross_entropy
from tokenizer import IMAGE_TOKEN
from weights import WeightsError

NUM_IMAGE_TOKENS = 256  # the test configs keep the released 16 x 16 grid (DiTConfig.input_size)
OFFICIAL_KEYS = Path(__file__).parents[1].parent / "shared" / "reference" / "official-keys-1.5b.txt"


def tiny_config(**over):
    return ScaleRAEConfig(**{**dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    dit=DiTConfig(hidden_size=64, depth=2, num_heads=4, in_channels=32, z_channels=48),
                                    mm_hidden_size=32), **over})


def tiny_model(seed=0, **over):
    over.setdefault("tie_word_embeddings", False)  # untied: a random tied model just repeats its last token
    torch.manual_seed(seed)
    model = ScaleRAE(tiny_config(**over)).eval()
    with torch.no_grad():  # a freshly initialized DiT outputs zeros (adaLN-Zero); give it something to say
        for p in model.diff_head.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def test_state_dict_matches_the_official_key_listing():
    """Key names and shapes of the 1.5B/2.4B preset equal the listing made from the official model class."""
    text = OFFICIAL_KEYS.read_text() if OFFICIAL_KEYS.exists() else pytest.skip("shared/reference not available")
    official = {}
    for line in text.splitlines():
        m = re.match(r"(\S+)\s+x\s*(\d+) (\(.*\))$", line)
        if m:
            official[m.group(1)] = (int(m.group(2)), m.group(3))
    with torch.device("meta"):
        model = ScaleRAE(SCALE_RAE_PRESETS["qwen1.5b-dit2.4b"])
    ours = {}
    for k, v in model.state_dict().items():  # the listing folds the first index into N and shows the first shape
        pattern = re.sub(r"\.\d+\.", ".N.", k, count=1)
        n, shape = ours.get(pattern, (0, str(tuple(v.shape))))
        ours[pattern] = (n + 1, shape)
    ours["lm_head.weight"] = (1, "(151667, 1536)")  # tied: official state_dict lists it, the saved file drops it
    assert ours == official
    numel = sum(v.numel() for k, v in model.state_dict().items() if k.startswith("diff_head.model."))
    assert numel == 2_435_977_664  # the official state-dict count (parameters + the RoPE tables)


def test_official_config_round_trip_and_unsupported_configs():
    cfg = tiny_config()
    d = cfg.to_official()
    assert ScaleRAEConfig.from_official(d) == cfg
    assert d["model_type"] == "qwen2" and d["diffusion_model_z_channels"] == 48 and d["mm_hidden_size"] == 32
    d["mm_vision_tower_aux_list"] = ["google/siglip2-so400m-patch14-224-interp256"]  # how training writes it
    assert ScaleRAEConfig.from_official(d).encoder == "google/siglip2-so400m-patch14-224"
    with pytest.raises(WeightsError, match="vision_loss_mode='block'.*diffusion_norm_stats_path"):
        ScaleRAEConfig.from_official({**d, "vision_loss_mode": "block", "diffusion_norm_stats_path": "x.pt"})
    with pytest.raises(WeightsError, match="diffusion_model_depth is missing"):
        ScaleRAEConfig.from_official({k: v for k, v in d.items() if k != "diffusion_model_depth"})
    # The token count is read from the config: 256 for the released models, 64 for the toy model, never non-square.
    toy = tiny_config(dit=DiTConfig(hidden_size=64, depth=2, num_heads=4, in_channels=32, z_channels=48, input_size=8))
    assert toy.to_official()["mm_vision_tower_aux_token_len_list"] == [64] and cfg.image_tokens == 256
    assert ScaleRAEConfig.from_official(toy.to_official()) == toy and toy.image_tokens == 64
    with pytest.raises(WeightsError, match=r"token_len_list=\[60\] \(must be a square grid\)"):
        ScaleRAEConfig.from_official({**d, "mm_vision_tower_aux_token_len_list": [60]})


def batch_with_images(model, L=300):
    """Row 0: understanding (image in the user turn), row 1: generation (image in the answer), row 2: text only."""
    ids = torch.randint(0, 290, (3, L))
    ids[0, 10:10 + NUM_IMAGE_TOKENS] = IMAGE_TOKEN
    ids[1, 30:30 + NUM_IMAGE_TOKENS] = IMAGE_TOKEN
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    labels[0, :280] = -100
    feats = torch.randn(3, NUM_IMAGE_TOKENS, 32)
    return ids, labels, feats, torch.tensor([False, True, False])


def test_embed_splices_projected_features_and_latent_queries():
    model = tiny_model()
    ids, _, feats, target = batch_with_images(model)
    with torch.no_grad():
        x = model.embed(ids, feats, target)
        assert torch.allclose(x[0, 10:266], model.model.mm_projector(feats[0]))
        assert torch.equal(x[1, 30:286], model.model.latent_queries)
        text = ids != IMAGE_TOKEN
        assert torch.equal(x[text], model.model.embed_tokens(ids[text]))


def test_training_loss_routes_gradients_like_the_official_model():
    model = tiny_model().train()
    ids, labels, feats, target = batch_with_images(model)
    loss, ce, diff = model.training_loss(ids, labels, feats, target)
    assert torch.isclose(loss, ce + 2.0 * diff)
    loss.backward()
    assert model.model.latent_queries.grad.abs().sum() > 0  # from the generation row
    assert model.model.mm_projector[0].weight.grad.abs().sum() > 0  # from the understanding row
    assert model.diff_head_projector.weight.grad.abs().sum() > 0
    # Only answer images carry the diffusion loss: with no generation row, the DiT gets no gradient from it.
    model.zero_grad()
    _, _, diff = model.training_loss(ids, labels, feats, torch.zeros(3, dtype=torch.bool))
    assert diff == 0
    # A batch without any label gives CE 0, never NaN.
    _, ce, _ = model.training_loss(ids, torch.full_like(labels, -100), feats, target)
    assert ce == 0


def plain_cross_entropy(h, W, targets):  # the full-vocabulary path the chunked one replaces
    return F.cross_entropy(F.linear(h, W).float().flatten(0, -2), targets.flatten(), ignore_index=-100,
                           reduction="sum")


def ce_and_grads(ce, h, W, targets):
    loss = ce(h, W, targets)
    loss.backward()
    out = loss.detach(), h.grad, W.grad
    h.grad = W.grad = None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_cross_entropy_equals_the_plain_one(dtype):
    """Loss and gradients (h, W) of the chunked CE equal F.cross_entropy on the whole logits to fp32 rounding (the
    logits are float32 in both), for rows (N, H) and for positions of a batch (B, T, H), with a chunk that divides
    neither and ignored targets, and with W padded past the vocabulary; the gradients come back in the inputs' dtype."""
    torch.manual_seed(0)
    for shape in [(37,), (3, 13)]:
        h = torch.randn(*shape, 16, dtype=dtype, requires_grad=True)
        W = torch.randn(50, 16, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, 50, shape)
        targets[..., ::4] = -100
        plain = ce_and_grads(plain_cross_entropy, h, W, targets)
        chunked = ce_and_grads(lambda *a: chunked_cross_entropy(*a, chunk=5), h, W, targets)
        # W padded with rows past the vocabulary (as train_tpu.py pads it to shard evenly): they take no part
        padded = torch.cat([W.detach(), torch.randn(14, 16, dtype=dtype)]).requires_grad_()
        loss, grad_h, grad_W = ce_and_grads(lambda *a: chunked_cross_entropy(*a, chunk=5, vocab=50), h, padded, targets)
        assert (grad_W[50:] == 0).all()
        for a, b in [*zip(plain, chunked), *zip(plain, (loss, grad_h, grad_W[:50]))]:
            assert a.dtype == b.dtype
            torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6 * a.abs().max().item())


def test_chunked_cross_entropy_under_bf16_autocast():
    """bf16 compute, fp32 master weights: h (bf16, or fp32 that autocast casts) and W (fp32) meet in a bf16 matmul as
    in the plain path under autocast; grad_h comes back in h's dtype, grad_W in fp32 (summed over chunks in fp32: the
    plain path's, rounded to bf16, is within bf16 rounding of it)."""
    torch.manual_seed(0)
    for h_dtype in (torch.bfloat16, torch.float32):
        h = torch.randn(3, 13, 16, dtype=h_dtype, requires_grad=True)
        W = torch.randn(50, 16, requires_grad=True)
        targets = torch.randint(0, 50, (3, 13))
        targets[..., ::4] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = ce_and_grads(plain_cross_entropy, h, W, targets)
            chunked = ce_and_grads(lambda *a: chunked_cross_entropy(*a, chunk=5), h, W, targets)
        assert [g.dtype for g in chunked] == [torch.float32, h_dtype, torch.float32]
        torch.testing.assert_close(chunked[0], plain[0], rtol=2e-6, atol=0)  # the same bf16-rounded logits
        torch.testing.assert_close(chunked[1], plain[1])
        torch.testing.assert_close(chunked[2], plain[2], rtol=2 ** -7, atol=2 ** -8 * plain[2].abs().max().item())


def test_training_loss_ce_and_its_gradients_equal_the_plain_cross_entropy():
    """The CE of training_loss (next-token targets, chunked) equals F.cross_entropy on the full shifted logits, and
    so do the gradients of every parameter, with the LM head tied to the embeddings (1.5B) and untied (7B)."""
    for tie in (False, True):
        model = tiny_model(tie_word_embeddings=tie).train()
        ids, labels, feats, target = batch_with_images(model)
        _, ce, _ = model.training_loss(ids, labels, feats, target)
        ce.backward()
        chunked = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        h = model(inputs_embeds=model.embed(ids, feats, target))
        plain = F.cross_entropy(model.logits(h[:, :-1]).flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        plain.backward()
        torch.testing.assert_close(ce, plain)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert chunked.keys() == grads.keys() and ("lm_head.weight" in grads) != tie
        for n, g in grads.items():
            torch.testing.assert_close(chunked[n], g, rtol=1e-4, atol=1e-6 * g.abs().max().item(), msg=n)

def test_k_tiling_averages_the_diffusion_loss_over_k_timesteps():
    """Official K-tiling (diffusion_timesteps_per_sample): each answer image is noised at K independent timesteps
    (K rows of one DiT batch, each with the image's own condition) and its loss is their mean; CE is untouched.
    Exact: the draws of the DiT loss are reproduced from the seed, then replayed one timestep per image through K
    runs at K = 1 (eval mode: no condition-dropout draw)."""
    model = tiny_model().eval()
    ids, labels, feats, target = batch_with_images(model)
    K, B, C, n = 4, ids.shape[0], model.config.dit.in_channels, model.config.dit.input_size
    head, loss, given, seen = model.diff_head, model.diff_head.loss, {}, []

    def replay(x0, y, t=None, noise=None):  # training_loss leaves t and noise to diff_head.loss, which draws them
        assert t is None and noise is None
        seen.append((x0, y))
        return loss(x0, y, given["t"], given["noise"])

    with torch.no_grad():
        torch.manual_seed(0)
        drawn = model.training_loss(ids, labels, feats, target, timesteps_per_image=K)
        torch.manual_seed(0)  # diff_head.loss's draws for B * K rows, in its order (t, then the bf16 noise)
        t = dit.time_shift(torch.sigmoid(torch.randn(B * K)), head.shift)
        noise = torch.randn(B * K, C, n, n, dtype=torch.bfloat16)
        head.loss, given["t"], given["noise"] = replay, t, noise
        tiled = model.training_loss(ids, labels, feats, target, timesteps_per_image=K)
        single = []
        for k in range(K):  # rows are image-major: image b at timestep k is row b * K + k
            given.update(t=t[k::K], noise=noise[k::K])
            single.append(torch.stack(model.training_loss(ids, labels, feats, target, timesteps_per_image=1)))
    assert all(torch.equal(a, b) for a, b in zip(drawn, tiled))  # the reproduced draws are the ones it made
    x0, y = seen[0]
    assert torch.equal(x0, feats.repeat_interleave(K, 0))
    assert all(torch.equal(y[k::K], seen[1 + k][1]) for k in range(K))  # each image's own condition, K times
    single = torch.stack(single)  # (K, 3): loss, ce, diff
    assert torch.equal(tiled[1], single[0, 1])
    torch.testing.assert_close(tiled[2], single[:, 2].mean(), rtol=1e-6, atol=0)
    assert (single[:, 2] - tiled[2]).abs().min() > 1e-4  # K different timesteps: the mean is none of them
    assert torch.isclose(tiled[0], tiled[1] + 2.0 * tiled[2])


def test_dynamic_shapes_run_the_dit_on_the_answer_images_alone():
    """static_shapes=False (eager PyTorch) skips the DiT on rows without an answer image: its diffusion loss is the
    one of the batch's answer images on their own, with the same draws; CE is the whole batch's."""
    model = tiny_model().train()
    ids, labels, feats, target = batch_with_images(model)
    torch.manual_seed(0)
    loss, ce, diff = model.training_loss(ids, labels, feats, target, timesteps_per_image=2, static_shapes=False)
    torch.manual_seed(0)
    _, _, alone = model.training_loss(ids[1:2], labels[1:2], feats[1:2], target[1:2], timesteps_per_image=2)
    _, ce_static, _ = model.training_loss(ids, labels, feats, target)
    assert torch.allclose(diff, alone, rtol=1e-5) and torch.allclose(ce, ce_static, rtol=1e-5)
    assert torch.isclose(loss, ce + 2.0 * diff)
    no_answer = torch.zeros(3, dtype=torch.bool)
    assert model.training_loss(ids, labels, feats, no_answer, static_shapes=False)[2] == 0


def reference_generate(model, prompt, image_start, stop, max_new):
    """The official greedy loop: no KV cache, the whole sequence re-run every step, break right after the image."""
    E = model.model.embed_tokens(torch.tensor([prompt]))
    out = []
    while True:
        token = model.logits(model(inputs_embeds=E)[:, -1]).argmax(-1)
        out.append(token.item())
        E = torch.cat([E, model.model.embed_tokens(token[:, None])], 1)
        if out[-1] == image_start:
            E = torch.cat([E, model.model.latent_queries[None]], 1)
            return out, model.diff_head_projector(model(inputs_embeds=E)[0, -model.config.image_tokens:])
        if out[-1] in stop or len(out) >= max_new:
            return out, None


@torch.no_grad()
@pytest.mark.parametrize("grid", [16, 8])  # the released 16 x 16 tokens, and the toy model's 8 x 8
def test_kv_cache_loop_equals_full_recompute_loop(grid):
    model = tiny_model(dit=DiTConfig(hidden_size=64, depth=2, num_heads=4, in_channels=32, z_channels=48,
                                     input_size=grid))
    T = grid * grid
    prompt = torch.randint(0, 290, (17,)).tolist()
    free = model.generate([prompt], stop_ids=set(), image_start_id=-1, max_new_tokens=6)[0][0]
    trigger = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])  # becomes "<im_start>"
    got_ids, got_cond = model.generate([prompt], stop_ids={-5}, image_start_id=trigger, max_new_tokens=10)[0]
    ref_ids, ref_cond = reference_generate(model, prompt, trigger, {-5}, 10)
    assert got_ids == ref_ids and got_ids[-1] == trigger and len(got_ids) >= 3
    assert got_cond.shape == (T, 48) and (got_cond - ref_cond).abs().max() < 1e-5
    seeds = [3]
    lat = model.sample_latents(got_cond[None], seeds, steps=4)
    ref = model.sample_latents(ref_cond[None], seeds, steps=4)
    assert lat.shape == (1, T, 32) and (lat - ref).abs().max() < 1e-4
    # Stopping: at a stop id (kept), and at max_new_tokens.
    ids, cond = model.generate([prompt], stop_ids={free[1]}, image_start_id=-1, max_new_tokens=10)[0]
    assert ids == free[:2] and cond is None
    assert model.generate([prompt], stop_ids=set(), image_start_id=-1, max_new_tokens=4)[0][0] == free[:4]


@torch.no_grad()
def test_batched_generation_equals_single_prompts():
    model = tiny_model()
    prompts = [torch.randint(0, 290, (n,)).tolist() for n in (5, 23, 11)]
    free = model.generate(prompts[1:2], stop_ids=set(), image_start_id=-1, max_new_tokens=3)[0][0]
    trigger = free[1]  # row 1 opens an image after one text token; the others may or may not
    batch = model.generate(prompts, stop_ids={7}, image_start_id=trigger, max_new_tokens=5)
    assert batch[1][1] is not None
    for p, (ids, cond) in zip(prompts, batch):
        ids1, cond1 = model.generate([p], stop_ids={7}, image_start_id=trigger, max_new_tokens=5)[0]
        assert ids == ids1
        assert (cond is None) == (cond1 is None)
        if cond is not None:
            assert (cond - cond1).abs().max() < 1e-5


@torch.no_grad()
def test_understanding_prompt_reads_the_image():
    """The 256 IMAGE_TOKEN slots of a prompt become 256 projected feature vectors; the answer equals the reference
    loop run on the spliced embeddings, and depends on the image."""
    model = tiny_model()
    prompt = [5, 6] + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS + [8, 9]
    feats = torch.randn(1, NUM_IMAGE_TOKENS, 32)
    ids, _ = model.generate([prompt], stop_ids=set(), image_start_id=-1, image_features=feats, max_new_tokens=4)[0]
    expanded = torch.tensor([[5, 6] + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS + [8, 9]])
    E = model.embed(expanded, feats, torch.tensor([False]))
    ref = []
    for _ in range(4):
        token = model.logits(model(inputs_embeds=E)[:, -1]).argmax(-1)
        ref.append(token.item())
        E = torch.cat([E, model.model.embed_tokens(token[:, None])], 1)
    assert ids == ref
    h1 = model(inputs_embeds=model.embed(expanded, feats, None))
    h2 = model(inputs_embeds=model.embed(expanded, feats * 2, None))
    assert (h1 - h2).abs().max() > 1e-3


def test_save_and_load_official_layout(tmp_path):
    from helpers import write_scale_rae_tokenizer
    from tokenizer import Tokenizer
    tok = Tokenizer.from_dir(write_scale_rae_tokenizer(tmp_path / "tok"))
    model = tiny_model(vocab_size=len(tok), tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "export", tok)
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "export", tok)
    loaded = ScaleRAE.from_pretrained(tmp_path / "export")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert Tokenizer.from_dir(tmp_path / "export").encode("<im_start>hi") == tok.encode("<im_start>hi")
    assert loaded.config == model.config
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "export" / "model.safetensors")
    sd["diff_head.model.extra"] = torch.zeros(1)
    del sd["model.latent_queries"]
    save_file(sd, tmp_path / "export" / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing \(1\): model.latent_queries\n  unexpected \(1\): diff_head.model.extra"):
        ScaleRAE.from_pretrained(tmp_path / "export")


@torch.no_grad()
def test_bfloat16_generation_and_sampling_track_float32():
    """bfloat16 is the GPU default: the whole generate -> sample_latents path runs in it and stays close to float32."""
    model = tiny_model()
    prompt = torch.randint(0, 290, (9,)).tolist()
    trigger = model.generate([prompt], stop_ids=set(), image_start_id=-1, max_new_tokens=1)[0][0][0]
    _, cond = model.generate([prompt], stop_ids=set(), image_start_id=trigger, max_new_tokens=1)[0]
    ref = model.sample_latents(cond[None], [0], steps=3)
    model = model.to(torch.bfloat16)
    _, cond16 = model.generate([prompt], stop_ids=set(), image_start_id=trigger, max_new_tokens=1)[0]
    lat = model.sample_latents(cond16[None], [0], steps=3, cfg_scale=2.0)
    assert cond16.dtype == torch.bfloat16 and lat.dtype == torch.float32
    assert (model.sample_latents(cond16[None], [0], steps=3) - ref).abs().max() < 0.25


def test_bfloat16_checkpoint_keeps_fixed_tables_in_float32(tmp_path, tok):
    model = tiny_model(vocab_size=len(tok))
    model.save_pretrained(tmp_path / "m", tok)
    loaded = ScaleRAE.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert loaded.diff_head.model.feat_rope.freqs_cos.dtype == torch.float32
    assert torch.equal(loaded.diff_head.model.feat_rope.freqs_sin, model.diff_head.model.feat_rope.freqs_sin)
    assert loaded.model.rotary.inv_freq.dtype == torch.float32


def test_fresh_model_uses_the_official_initialization():
    torch.manual_seed(0)
    model = ScaleRAE(tiny_config(vocab_size=5000, hidden_size=128, intermediate_size=256))
    emb = model.model.embed_tokens.weight
    assert abs(emb.std().item() - 0.02) < 0.002 and model.model.layers[0].self_attn.q_proj.bias.abs().max() == 0
    assert abs(model.diff_head_projector.weight.std().item() - 0.02) < 0.002
    w = model.model.mm_projector[0].weight  # PyTorch's default (kaiming-uniform) for the projector, not N(0, 0.02)
    assert w.abs().max() <= 1 / 32 ** 0.5 and w.std() > 0.1
    assert abs(model.model.latent_queries.std().item() - 128 ** -0.5) < 0.01
    # A fresh model's CE is about log(V): no huge logits at the start of training.
    ids = torch.randint(0, 5000, (2, 20))
    with torch.no_grad():
        loss, ce, diff = model.training_loss(ids, ids, torch.zeros(2, 256, 32), torch.zeros(2, dtype=torch.bool))
    assert abs(ce.item() - math.log(5000)) < 0.5


def test_toy_llm_init_makes_the_query_states_depend_on_the_prompt():
    """The toy preset's initializer_range (1/sqrt(128), not Qwen's 0.02) is what a fresh model is drawn with, and it
    is why the DiT's condition depends on the prompt from the start: the share of the variance of the latent
    queries' final states that changes with the prompt (measured: 0.9% at 0.02, 45% at 1/sqrt(128))."""
    from dataclasses import replace

    from dit import DIT_PRESETS
    from model import QWEN_PRESETS

    def prompt_share(initializer_range):
        torch.manual_seed(0)
        llm = replace(QWEN_PRESETS["toy"], vocab_size=460, initializer_range=initializer_range)
        model = ScaleRAE(ScaleRAEConfig(**vars(llm), dit=DIT_PRESETS["toy"], mm_hidden_size=96)).eval()
        assert abs(model.model.embed_tokens.weight.std().item() - initializer_range) < 0.1 * initializer_range
        T = model.config.image_tokens
        # 32 prompts as the toy data's: a shared template (24 tokens) around a few words (6) that differ
        template, words = torch.randint(0, 460, (1, 24)).expand(32, -1), torch.randint(0, 460, (32, 6))
        ids = torch.cat([template[:, :16], words, template[:, 16:], torch.full((32, T), IMAGE_TOKEN)], 1)
        with torch.no_grad():
            h = model(inputs_embeds=model.embed(ids, torch.zeros(32, T, 96), torch.ones(32, dtype=torch.bool)))
        q = h[:, -T:]  # (32, T, H) the queries' states
        return (q.var(0).sum() / (q - q.mean((0, 1))).pow(2).mean(0).sum()).item()

    assert QWEN_PRESETS["toy"].initializer_range == 128 ** -0.5
    assert prompt_share(0.02) < 0.02 and prompt_share(128 ** -0.5) > 0.15  # here: 0.4% and 31%


def test_resize_token_embeddings_mean_initializes_the_new_rows():
    """Stage 1 from Qwen2.5: 151936 padded rows -> len(tokenizer); <im_start>, <im_end> = mean of the old rows."""
    for tie in (True, False):
        model = tiny_model(vocab_size=300, tie_word_embeddings=tie)
        old = model.model.embed_tokens.weight.detach().clone()
        model.resize_token_embeddings(290)
        emb = model.model.embed_tokens.weight
        assert emb.shape == (290, 64) and model.config.vocab_size == 290 and emb.requires_grad
        assert torch.equal(emb[:288], old[:288]) and torch.allclose(emb[288], old[:288].mean(0))
        assert torch.equal(emb[288], emb[289]) and model.lm_head_weight.shape == (290, 64)
        ids = torch.randint(0, 290, (1, 8))
        with torch.no_grad():
            assert model.logits(model(ids)).shape == (1, 8, 290)
