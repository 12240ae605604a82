"""model.py: parity with transformers' Qwen2 (the numerical reference), strict loading, the static KV cache
against a full recompute, generation, and the TinyGroundingGPT forward / save / load / from_components."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from encoders import VisionConfig
from model import Qwen2, Qwen2Config, TinyGroundingGPT, TinyGroundingGPTConfig, load_qwen2

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- Qwen2 against transformers


def hf_qwen(tied: bool, heads: int = 4, kv_heads: int = 2, vocab: int = 96, seed: int = 0):
    """A tiny random transformers Qwen2ForCausalLM with non-trivial biases and norm weights."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=8 * heads, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=256)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)  # transformers initializes biases to zero: a dropped bias would go unseen
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(std=0.2)  # larger than the 0.02 init, so the logits differ between tokens
    return model


def ours_from(hf_model, directory, sharded=False) -> Qwen2:
    hf_model.save_pretrained(directory, max_shard_size="20KB" if sharded else "1GB")
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json")) == sharded
    return load_qwen2(str(directory))


@pytest.mark.parametrize("tied,sharded,heads,kv_heads", [(True, False, 4, 2), (False, True, 6, 2)])
def test_qwen2_logits_match_transformers(tmp_path, tied, sharded, heads, kv_heads):
    hf = hf_qwen(tied, heads, kv_heads)
    ours = ours_from(hf, tmp_path, sharded)
    assert (ours.lm_head is None) == tied
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
        # left padding: real tokens get the logits they would get alone, positions counted over real tokens
        mask = torch.ones(2, 11, dtype=torch.bool)
        mask[1, :4] = False
        expected = hf(ids[1:, 4:]).logits[0]
        torch.testing.assert_close(ours(ids, attention_mask=mask)[1, 4:], expected, atol=1e-5, rtol=0)


def test_qwen2_bf16_is_bit_identical_to_transformers(tmp_path):
    """In bf16 the order of casts matters (RMSNorm: normalize in fp32, cast, then scale; RoPE angles in fp32),
    which fp32 cannot see. Loaded by both sides in bf16, the logits agree exactly."""
    hf_qwen(tied=False).save_pretrained(tmp_path)
    ours = load_qwen2(str(tmp_path), dtype=torch.bfloat16)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)


def test_qwen2_last_layer_attention_matches_transformers_eager(tmp_path):
    hf = hf_qwen(tied=True)
    ours = ours_from(hf, tmp_path)
    hf.config._attn_implementation = "eager"
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        logits, attn = ours(ids, return_last_attn=True)
        out = hf(ids, output_attentions=True)
    torch.testing.assert_close(attn, out.attentions[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)


def test_load_qwen2_errors_name_the_problem(tmp_path):
    hf_qwen(tied=False).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    good = load_file(file)

    def load_with(state):
        save_file(state, file)
        return load_qwen2(str(tmp_path))

    missing = {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensors, in none of .*: \['model.layers.1.mlp.up_proj.weight'\]"):
        load_with(missing)
    with pytest.raises(ValueError, match=r"unexpected tensors: \['model.extra.weight \(in .*safetensors\)"):
        load_with({**good, "model.extra.weight": torch.zeros(2)})
    wrong = r"wrong shapes or dtypes: \[.model.norm.weight in .*\[31\] torch.float32, expected \[32\]"
    with pytest.raises(ValueError, match=wrong):
        load_with({**good, "model.norm.weight": torch.ones(31)})
    load_with(good)  # the untouched checkpoint loads
    os.remove(file)
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_qwen2(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_qwen2(str(tmp_path / "nowhere"))


def test_load_qwen2_missing_shard(tmp_path):
    hf_qwen(tied=True).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.startswith("model-"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_qwen2(str(tmp_path))


def left_pad(prompts: list[list[int]], pad: int = 0):
    P = max(map(len, prompts))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 17, 33, 2, 9, 61, 40], [7, 7, 80], [1, 2, 3, 4, 5]]


def test_kv_cache_decode_equals_full_recompute(tmp_path):
    model = ours_from(hf_qwen(tied=False), tmp_path)
    ids, mask = left_pad(PROMPTS)
    B, P = ids.shape
    steps = 6
    with torch.no_grad():
        # the fast path by hand: prefill, then one token per step, logits kept
        cache_len = model.setup_cache(B, P + steps)
        key_valid = torch.ones(B, cache_len, dtype=torch.bool)
        key_valid[:, :P] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=key_valid, positions=positions, cache_slots=torch.arange(P))[:, -1]
        fast_logits, tokens = [logits], [logits.argmax(-1)]
        for step in range(steps - 1):
            logits = model.decode_step(tokens[-1][:, None], positions[:, -1:] + 1 + step,
                                       torch.tensor([P + step]), key_valid)
            fast_logits.append(logits)
            tokens.append(logits.argmax(-1))
        fast = torch.stack(tokens, 1).tolist()
        # the slow twin: every row alone, unpadded, the whole sequence recomputed at every step
        for row, prompt in enumerate(PROMPTS):
            seq = list(prompt)
            for step in range(steps):
                full = model(torch.tensor([seq]))[0, -1]
                torch.testing.assert_close(fast_logits[step][row], full, atol=1e-5, rtol=0)
                seq.append(int(full.argmax()))
            assert fast[row] == seq[len(prompt):]
        generated = model.generate(model.embed_tokens(ids), mask, max_new_tokens=steps)
        model.setup_cache(B, 64)  # a longer cache (stale slots included) is reused and changes nothing
        assert model.generate(model.embed_tokens(ids), mask, max_new_tokens=steps) == generated
    assert generated == fast


def test_greedy_generate_equals_transformers(tmp_path):
    hf = hf_qwen(tied=True, seed=1)
    ours = ours_from(hf, tmp_path)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
        mine = ours.generate(ours.embed_tokens(ids), mask, max_new_tokens=10)
    assert mine == theirs.tolist()


def test_generate_stops_per_row_and_never_samples_padding_rows(tmp_path):
    model = ours_from(hf_qwen(tied=True, seed=2), tmp_path)
    ids, mask = left_pad(PROMPTS)
    embeds = model.embed_tokens(ids).detach()
    free = model.generate(embeds, mask, max_new_tokens=8)
    stop = free[0][2]  # row 0 stops after two tokens; the others stop at their first `stop`, if any
    stopped = model.generate(embeds, mask, max_new_tokens=8, stop_token_ids=[stop])
    assert stopped == [row[:row.index(stop)] if stop in row else row for row in free]
    assert len(stopped[0]) == 2
    # nearly uniform sampling over 96 ids: without the cut, ids >= 80 would appear ~1/6 of the time
    gen = torch.Generator().manual_seed(0)
    sampled = model.generate(embeds, mask, max_new_tokens=40, sampleable_size=80, temperature=100.0,
                             generator=gen)
    flat = [t for row in sampled for t in row]
    assert len(flat) == 120 and max(flat) < 80 and len(set(flat)) > 30
    # a tiny top_p keeps only the most likely token: sampling becomes greedy
    assert model.generate(embeds, mask, max_new_tokens=8, temperature=1.0, top_p=1e-6, generator=gen) == free


def test_qwen2_config_from_hub_json():
    hub = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "rope_theta": 1000000.0,
           "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "sliding_window": 32768,
           "use_sliding_window": False, "rope_scaling": None, "hidden_act": "silu", "torch_dtype": "bfloat16"}
    config = Qwen2Config.from_hf(hub)
    assert config == Qwen2Config() and config.head_dim == 128
    with pytest.raises(ValueError, match="x.json: unsupported Qwen2 settings: use_sliding_window"):
        Qwen2Config.from_hf({**hub, "use_sliding_window": True}, "x.json")
    with pytest.raises(ValueError, match="missing Qwen2 fields"):
        Qwen2Config.from_hf({"vocab_size": 4})


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Qwen2(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).train()
    ids = torch.randint(0, 64, (2, 9))
    calls = []
    model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(calls) == 3  # once plain; forward + recompute in backward with checkpointing
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- TinyGroundingGPT

PAD, IMAGE, OBJECT, END = 0, 60, 61, 62


def tiny_config(**overrides) -> TinyGroundingGPTConfig:
    tower = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_size=32, patch_size=4, image_size=16)
    llm = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    fields = dict(vision=[VisionConfig(kind="clip", **tower), VisionConfig(kind="dinov2", **tower)], llm=llm,
                  image_token_id=IMAGE, object_token_id=OBJECT, pad_token_id=PAD, stop_token_ids=[END, PAD],
                  sampleable_size=63, object_tokens=4)
    return TinyGroundingGPTConfig(**{**fields, **overrides})


def tiny_batch():
    """Two samples: text + <image> (16 patch tokens) + question; the second also has an <object> (4 tokens).
    Right-padded as data.py collates; labels on the answers only."""
    a = [1, 2] + [IMAGE] * 16 + [3, 4, 5, 6, 7, END]
    b = [1] + [IMAGE] * 16 + [8] + [OBJECT] * 4 + [9, 10, 11, 12, END]
    L = max(len(a), len(b))
    ids = torch.tensor([s + [PAD] * (L - len(s)) for s in (a, b)])
    labels = torch.full_like(ids, -100)
    labels[0, len(a) - 4:len(a)] = ids[0, len(a) - 4:len(a)]
    labels[1, len(b) - 4:len(b)] = ids[1, len(b) - 4:len(b)]
    torch.manual_seed(1)
    return dict(input_ids=ids, attention_mask=ids != PAD, labels=labels, images=torch.randn(2, 2, 3, 16, 16),
                objects=torch.randn(1, 2, 3, 16, 16))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = TinyGroundingGPT(tiny_config()).train()
    assert not model.encoder.training and not any(p.requires_grad for p in model.encoder.parameters())
    batch = tiny_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        logits, loss = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert logits.shape == (8, 64)  # with labels: the logits of the 8 labeled positions only
    assert loss.item() < 0.02
    assert all(p.grad is None for p in model.encoder.parameters())  # frozen towers: no_grad
    assert model.projector.fc1.weight.grad is not None


def test_loss_is_answer_tokens_only_and_right_padding_changes_nothing():
    torch.manual_seed(0)
    model = TinyGroundingGPT(tiny_config()).eval()
    batch = tiny_batch()
    with torch.no_grad():
        logits, _ = model(**{k: v for k, v in batch.items() if k != "labels"})  # all positions: [B, L, V]
        labeled_logits, loss = model(**batch)  # the head on the labeled positions alone
        keep = batch["labels"][:, 1:] != -100
        torch.testing.assert_close(labeled_logits, logits[:, :-1][keep], atol=1e-6, rtol=0)
        expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], batch["labels"][:, 1:][keep])
        torch.testing.assert_close(loss, expected)
        # the unpadded first sample alone: same logits on its real tokens
        n = int(batch["attention_mask"][0].sum())
        alone, _ = model(batch["input_ids"][:1, :n], images=batch["images"][:1])
        torch.testing.assert_close(alone[0], logits[0, :n], atol=1e-5, rtol=0)
        _, _, attn = model(**batch, return_last_attn=True)
    assert attn.shape == (2, 4, 27, 27)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 27))



def test_sample_mean_loss_weighs_each_answer_alike():
    """loss_mean="sample": the mean over samples of each one's mean answer-token loss (a 2-token answer weighs as
    much as a 4-token one), against cross-entropy on the full logits, row by row."""
    torch.manual_seed(0)
    model = TinyGroundingGPT(tiny_config()).eval()
    batch = tiny_batch()
    batch["labels"][0, :22] = -100  # sample 0 (24 tokens, then padding): one answer token and the stop token
    with torch.no_grad():
        logits, _ = model(**{k: v for k, v in batch.items() if k != "labels"})  # [B, L, V]
        _, token_mean = model(**batch)
        _, sample_mean = model(**batch, loss_mean="sample")
        ce = torch.nn.functional.cross_entropy
        rows = [ce(logits[b, :-1][keep], batch["labels"][b, 1:][keep])
                for b, keep in enumerate(batch["labels"][:, 1:] != -100)]
        torch.testing.assert_close(sample_mean, torch.stack(rows).mean())
        assert abs(sample_mean - token_mean) > 1e-3  # the two means differ on answers of unequal length
        with pytest.raises(ValueError, match="loss_mean must be 'token' or 'sample', got 'answer'"):
            model(**batch, loss_mean="answer")


def test_placeholder_count_mismatch_raises():
    model = TinyGroundingGPT(tiny_config())
    batch = tiny_batch()
    with pytest.raises(ValueError, match=r"32 image placeholder tokens .* but 1 images x 16 tokens = 16"):
        model(batch["input_ids"], images=batch["images"][:1], objects=batch["objects"])
    with pytest.raises(ValueError, match=r"4 object placeholder tokens .* but 0 objects"):
        model(batch["input_ids"], images=batch["images"])
    with pytest.raises(ValueError, match="object_tokens=5 must be a square"):
        TinyGroundingGPT(tiny_config(object_tokens=5))


def test_multimodal_generate_batched_equals_one_at_a_time():
    torch.manual_seed(0)
    model = TinyGroundingGPT(tiny_config()).eval()
    prompts = [[1, 2] + [IMAGE] * 16 + [3], [1] + [IMAGE] * 16 + [8] + [OBJECT] * 4 + [9, 10, 11]]
    images, objects = torch.randn(2, 2, 3, 16, 16), torch.randn(1, 2, 3, 16, 16)
    together = model.generate(prompts, images, objects, max_new_tokens=6)
    alone = [model.generate(prompts[:1], images[:1], max_new_tokens=6),
             model.generate(prompts[1:], images[1:], objects, max_new_tokens=6)]
    assert together == alone[0] + alone[1]
    assert all(len(row) <= 6 and all(t < 63 for t in row) for row in together)


def test_questions_sharing_an_image_prefill_it_once_and_answer_as_alone():
    """generate(image_of=...), eval's fast path for several questions about one image, against its slow twin
    (each prompt with its own copy of the image): the same answers, and the prompts' common start through the
    image is computed once per image (the LM runs on U prefixes, then on the rows' own tokens)."""
    torch.manual_seed(0)
    model = TinyGroundingGPT(tiny_config()).eval()
    start = [1, 2] + [IMAGE] * 16 + [3, 4]
    prompts = [start + [5], start + [6, 7, 8], start + [9, 10], start + [11, 12, 13, 14], start + [5]]
    image_of = [0, 1, 0, 2, 2]
    images = torch.randn(3, 2, 3, 16, 16)
    lengths = []
    hook = model.llm.layers[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[:2]))
    shared = model.generate(prompts, images, max_new_tokens=6, image_of=image_of)
    hook.remove()
    assert [tuple(n) for n in lengths[:2]] == [(3, len(start)), (5, 4)]  # 3 prefixes of 20, then 5 rows of <= 4
    alone = model.generate(prompts, images[image_of], max_new_tokens=6)
    assert shared == alone and len({tuple(row) for row in alone}) > 2  # answers that depend on the input
    with pytest.raises(ValueError, match="the same through the image"):
        model.generate([[1] + [IMAGE] * 16, [2] + [IMAGE] * 16], images[:2], image_of=[0, 1])
    for bad in ([0], [0, 3], [0, -1]):  # one index per prompt, each naming one of the images
        with pytest.raises(ValueError, match="image_of needs one index into the 3 images per prompt"):
            model.generate(prompts[:2], images, image_of=bad)
    # 3 images, 2 prompts about the last one: the images nobody asks about are not computed (nor overflow the rows)
    assert model.generate(prompts[:2], images, max_new_tokens=6, image_of=[2, 2]) == \
        model.generate(prompts[:2], images[[2, 2]], max_new_tokens=6)


def test_save_and_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyGroundingGPT(tiny_config()).eval()
    (tmp_path / "tok.json").write_text('{"fake": "tokenizer"}')
    assert model.num_image_tokens == 16
    model.save_pretrained(str(tmp_path / "out"), tokenizer_path=str(tmp_path / "tok.json"))
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = TinyGroundingGPT.from_pretrained(str(tmp_path / "out"))
    assert loaded.config == model.config
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}  # no labels: logits at every position
    with torch.no_grad():
        assert torch.equal(loaded(**batch)[0], model(**batch)[0])
    # a checkpoint that does not fit its config.json is refused with the key named
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["llm"]["num_hidden_layers"] = 3
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing tensors, in none of .*: \['llm.model.layers.2"):
        TinyGroundingGPT.from_pretrained(str(tmp_path / "out"))
    # an export from before two fields were removed (commit 31d6f20) loads; one that used them is refused
    config["llm"]["num_hidden_layers"] = model.config.llm.num_hidden_layers
    (tmp_path / "out" / "config.json").write_text(json.dumps({**config, "train_towers": False,
                                                              "image_after_question": False}))
    assert TinyGroundingGPT.from_pretrained(str(tmp_path / "out")).config == model.config
    (tmp_path / "out" / "config.json").write_text(json.dumps({**config, "image_after_question": True}))
    with pytest.raises(ValueError, match="image_after_question=true is no longer supported"):
        TinyGroundingGPT.from_pretrained(str(tmp_path / "out"))
    os.remove(tmp_path / "out" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="out has no model.safetensors"):
        TinyGroundingGPT.from_pretrained(str(tmp_path / "out"))


def test_loading_an_export_does_not_import_torch_dynamo():
    """Exports are built on the meta device, where torch's normal_ imports torch._dynamo: ~2 s of every
    sample.py or eval.py start (a subprocess: a fresh interpreter). A random model still gets its init."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, model; model.TinyGroundingGPT.from_pretrained('assets/shapes-model'); "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
    config = Qwen2Config(vocab_size=500, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    weight = Qwen2(config).embed_tokens.weight
    assert weight.requires_grad and 0.018 < weight.std() < 0.022 and abs(weight.mean()) < 0.002


def test_an_export_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A death while an export is written (here: copying the tokenizer, the last file) leaves no folder that
    looks exported; before, config.json and model.safetensors stood there without tokenizer.json."""
    model = TinyGroundingGPT(tiny_config())
    (tmp_path / "tok.json").write_text("{}")
    out = tmp_path / "stage2"

    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", die)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(out), tokenizer_path=str(tmp_path / "tok.json"))
    monkeypatch.undo()
    assert not out.exists()
    model.save_pretrained(str(out), tokenizer_path=str(tmp_path / "tok.json"))  # the rerun: whole, no leftovers
    assert sorted(os.listdir(tmp_path)) == ["stage2", "tok.json"]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    model.save_pretrained(str(out), tokenizer_path=str(tmp_path / "tok.json"))  # replacing an export
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds more than an export"):
        model.save_pretrained(str(out))
    assert (out / "notes.txt").read_text() == "mine"


def test_damaged_export_files_are_named(tmp_path):
    import data

    model = TinyGroundingGPT(tiny_config())
    (tmp_path / "tok.json").write_text("{}")
    model.save_pretrained(str(tmp_path / "good"), tokenizer_path=str(tmp_path / "tok.json"))
    for name, damage, message in [
            ("config.json", b'{"llm": ', r"^\S+config.json: not a JSON config \(Expecting"),  # the file named once
            ("config.json", b'{"llm": 3}', "config.json: not a TinyGroundingGPT config"),
            ("model.safetensors", b"\x00" * 64, "model.safetensors: not a readable safetensors file"),
            ("model.safetensors", None, "wrong shapes or dtypes: .*int64, expected .* floating point")]:
        shutil.rmtree(tmp_path / "bad", ignore_errors=True)
        shutil.copytree(tmp_path / "good", tmp_path / "bad")
        if damage is None:  # an integer tensor where weights belong: it loaded, then failed at inference
            state = load_file(tmp_path / "good" / "model.safetensors")
            key = next(iter(state))
            save_file({**state, key: state[key].long()}, tmp_path / "bad" / "model.safetensors")
        else:
            (tmp_path / "bad" / name).write_bytes(damage)
        with pytest.raises(ValueError, match=message) as err:
            TinyGroundingGPT.from_pretrained(str(tmp_path / "bad"))
        assert str(tmp_path / "bad") in str(err.value)
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    config["llm"]["hidden_size"] = str(config["llm"]["hidden_size"])  # before: a TypeError inside nn.Linear
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: not a .* Qwen2Config.hidden_size must be int, got '\d+'"):
        TinyGroundingGPT.from_pretrained(str(tmp_path / "bad"))
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model"')
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer.json'}: not a readable tokenizer.json"):
        data.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'nothing.json'}: not a readable tokenizer.json"):
        data.Tokenizer.from_file(str(tmp_path / "nothing.json"))


def test_from_components_builds_from_hub_layouts(tmp_path):
    """Tiny CLIP, DINOv2 and Qwen2 checkpoints saved by transformers, plus a tokenizer.json with Qwen's
    special tokens: one call builds the model, the LLM's logits match transformers'."""
    from tokenizers import Tokenizer, models

    vision = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  patch_size=4, image_size=16)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "clip")
    transformers.Dinov2Model(transformers.Dinov2Config(**{**vision, "mlp_ratio": 2})).save_pretrained(
        tmp_path / "dino")
    hf = hf_qwen(tied=True)
    hf.save_pretrained(tmp_path / "qwen")
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|image_pad|>"])
    tok.save(str(tmp_path / "qwen" / "tokenizer.json"))

    model = TinyGroundingGPT.from_components(str(tmp_path / "clip"), str(tmp_path / "dino"),
                                             str(tmp_path / "qwen"), image_size=16, object_tokens=4)
    c = model.config
    assert (c.pad_token_id, c.stop_token_ids, c.object_token_id, c.image_token_id) == (2, [4, 2], 5, 6)
    assert c.sampleable_size == 7 and c.object_tokens == 4 and model.encoder.hidden_size == 32
    ids = torch.randint(0, 5, (1, 5))  # no placeholder ids (5, 6): text only
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="unknown config fields"):
        TinyGroundingGPT.from_components(*(str(tmp_path / d) for d in ("clip", "dino", "qwen")),
                                         image_size=16, object_token=4)


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_logits_and_decode_match_cpu(tmp_path):
    """fp32 on the GPU against the CPU: the same logits, and the same greedy tokens from the eager decode and
    from the compiled one-token step (CUDA graphs), the fast path `sample.py --compile` takes."""
    cpu = ours_from(hf_qwen(tied=False), tmp_path)
    gpu = load_qwen2(str(tmp_path), device="cuda")
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        expected = cpu(ids, attention_mask=mask)
        got = gpu(ids.cuda(), attention_mask=mask.cuda()).cpu()
        torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=0)
        tokens = cpu.generate(cpu.embed_tokens(ids), mask, max_new_tokens=8)
        embeds, mask = gpu.embed_tokens(ids.cuda()), mask.cuda()
        assert gpu.generate(embeds, mask, max_new_tokens=8) == tokens
        assert gpu.generate(embeds, mask, max_new_tokens=8, compile=True) == tokens


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_logits_close_to_transformers(tmp_path):
    """bf16 on the GPU: ours and transformers (SDPA) pick different kernels, so equality is not expected;
    both stay within bf16 rounding of the fp32 logits."""
    hf_qwen(tied=False).save_pretrained(tmp_path)
    ours = load_qwen2(str(tmp_path), dtype=torch.bfloat16, device="cuda")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    reference = load_qwen2(str(tmp_path), device="cuda")
    ids = torch.randint(0, 96, (2, 11), device="cuda")
    with torch.no_grad():
        exact = reference(ids)
        for logits in (ours(ids).float(), hf(ids).logits.float()):
            assert ((logits - exact).norm() / exact.norm()).item() < 2e-2
