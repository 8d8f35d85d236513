"""LM policy pieces on tiny random models: log-probs, padding, dropout, LoRA reference, heads, pad token."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch
from transformers import AutoModelForCausalLM

from proxrl.lm.config import ModelOptions
from proxrl.lm.policy import LMPolicy, RewardModel, build_policy, last_real_index, token_logp
from proxrl.lm.loading import ensure_pad_token, left_pad, load_causal_lm, load_tokenizer
from proxrl.lm.tiny import make_tiny


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp(request.param), arch=request.param))


def _plain_logp(path, seqs, n_resp, T, entropy=False):
    """Reference: each sequence alone, no padding, plain HF forward with default positions (and, with
    ``entropy``, the per-token entropy of softmax(logits / T))."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    out, ents = [], []
    for s in seqs:
        ids = torch.tensor([s])
        logp_all = torch.log_softmax(model(input_ids=ids).logits[0, -n_resp - 1:-1] / T, -1)
        out.append(logp_all.gather(-1, ids[0, -n_resp:, None]).squeeze(-1))
        ents.append(-(logp_all.exp() * logp_all).sum(-1))
    return (torch.stack(out), torch.stack(ents)) if entropy else torch.stack(out)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_logp_equals_plain_forward_with_and_without_left_padding(tiny, finetune):
    opts = ModelOptions(finetune=finetune, dtype="float64")
    pol = build_policy(tiny, opts)
    T, R = 0.7, 4
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34, 35, 36]]
    ids, mask = left_pad(seqs, pol.tokenizer.pad_token_id)  # prompts of different length → left padding
    logp, values, ent = pol(ids, mask, R, T)
    expected = _plain_logp(tiny, seqs, R, T)
    torch.testing.assert_close(logp, expected, atol=1e-10, rtol=0)
    # unpadded, one at a time, through the same code path
    for i, s in enumerate(seqs):
        one, _, _ = pol(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), R, T)
        torch.testing.assert_close(one[0], expected[i], atol=1e-10, rtol=0)
    # the reference is the initial policy: same log-probs before any update
    torch.testing.assert_close(pol.ref_logp(ids, mask, R, T), expected, atol=1e-10, rtol=0)
    assert values.shape == (3, R)
    _, want_ent = _plain_logp(tiny, seqs, R, T, entropy=True)
    torch.testing.assert_close(ent, want_ent, atol=1e-10, rtol=0)
    logp_g, _, ent_g = pol(ids, mask, R, T, entropy_grad=True)  # the differentiable entropy: same values
    assert ent_g.requires_grad and not ent.requires_grad
    torch.testing.assert_close(ent_g.detach(), want_ent, atol=1e-10, rtol=0)


def test_temperature_divides_logits():
    logits = torch.randn(2, 3, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (2, 3))
    want = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logp(logits, tokens, 0.5), want)


def test_dropout_off_even_when_train_is_called(tiny, tmp_path):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(tiny)
    for k in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.5)
    model = AutoModelForCausalLM.from_pretrained(tiny, config=cfg, dtype=torch.float64)
    pol = LMPolicy(model, load_tokenizer(tiny), ModelOptions(finetune="full"))
    pol.train()
    assert not any(m.training for m in pol.modules())
    ids = torch.randint(3, 200, (2, 10))
    a, _, _ = pol(ids, torch.ones_like(ids), 4)
    b, _, _ = pol(ids, torch.ones_like(ids), 4)
    assert torch.equal(a, b)


def test_lora_reference_is_the_base_model_after_training(tiny):
    pol = build_policy(tiny, ModelOptions(finetune="lora", dtype="float64", lora_r=4))
    assert pol.ref_lm is None  # no second copy in memory (LM-14)
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    base_logp = _plain_logp(tiny, ids.tolist(), 5, 1.0)
    # move the adapters away from their zero init so the policy differs from the base
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    logp, _, _ = pol(ids, mask, 5)
    assert (logp - base_logp).abs().max() > 1e-3
    torch.testing.assert_close(pol.ref_logp(ids, mask, 5), base_logp, atol=1e-10, rtol=0)
    # only adapters and the value head are trainable and checkpointed
    names = list(pol.trainable_state())
    assert names and all("lora_" in n or n.startswith("value_head.") for n in names)


def test_layers_finetune_trains_only_the_last_blocks(tiny):
    pol = build_policy(tiny, ModelOptions(finetune="layers", train_layers=1))
    trainable = [n for n in pol.trainable_state() if not n.startswith("value_head.")]
    assert trainable and all((".1." in n) for n in trainable), trainable  # block 1 of blocks 0..1
    assert pol.ref_lm is not None and not any(p.requires_grad for p in pol.ref_lm.parameters())


def test_separate_critic_gives_values_without_touching_the_policy(tiny):
    pol = build_policy(tiny, ModelOptions(finetune="full", dtype="float64"), critic="separate")
    ids = torch.randint(3, 200, (2, 9))
    mask = torch.ones_like(ids)
    logp, v, _ = pol(ids, mask, 3)
    v.sum().backward()
    assert all(p.grad is None for p in pol.lm.parameters())
    assert any(p.grad is not None for p in pol.critic_lm.parameters())


def test_pad_is_never_eos():
    class Tok:
        eos_token_id, pad_token_id, unk_token, bos_token = 2, 2, "<unk>", "<s>"
        padding_side = "right"

        def convert_tokens_to_ids(self, t):
            return {"<unk>": 0, "<s>": 1}[t]

        @property
        def pad_token(self):
            return None

        @pad_token.setter
        def pad_token(self, t):
            self.pad_token_id = self.convert_tokens_to_ids(t)

    tok = Tok()
    assert ensure_pad_token(tok) == 0 and tok.padding_side == "left"


def test_reward_model_scores_at_last_real_token(tiny):
    base = load_causal_lm(tiny, torch.float64)
    tok = load_tokenizer(tiny)
    ensure_pad_token(tok, base)
    rm = RewardModel(base, tok, ModelOptions(finetune="full"))
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    left_ids, left_mask = left_pad(seqs, tok.pad_token_id)
    right_ids = torch.full_like(left_ids, tok.pad_token_id)
    right_mask = torch.zeros_like(left_mask)
    for i, s in enumerate(seqs):
        right_ids[i, :len(s)] = torch.tensor(s)
        right_mask[i, :len(s)] = 1
    assert last_real_index(right_mask).tolist() == [4, 2]
    alone = torch.stack([rm.raw(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    torch.testing.assert_close(rm.raw(left_ids, left_mask), alone, atol=1e-10, rtol=0)
    torch.testing.assert_close(rm.raw(right_ids, right_mask), alone, atol=1e-10, rtol=0)
    # the padding token's hidden state is not what is read: changing pad ids changes nothing
    right_ids[1, 3:] = 77
    torch.testing.assert_close(rm.raw(right_ids, right_mask), alone, atol=1e-10, rtol=0)


def test_head_init_scale():
    from proxrl.lm.policy import make_head
    torch.manual_seed(0)
    head = make_head(10000, torch.float64)
    assert abs(head.weight.std().item() - 1 / (10001 ** 0.5)) < 1e-3 and head.bias.abs().max() == 0


def test_fused_gelu_is_the_same_function(tmp_path):
    """load_causal_lm swaps GPT-2's Python-composed gelu_new for torch's fused tanh-GELU: every MLP is
    swapped, the logits agree with the stock model to float rounding, and a SiLU model is left alone."""
    from transformers.activations import GELUTanh, NewGELUActivation

    from proxrl.lm.loading import fuse_activations, load_causal_lm

    path = make_tiny(tmp_path / "gpt2", arch="gpt2", layers=2, hidden=64)
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    fused = load_causal_lm(str(path))
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, GELUTanh) for m in fused.modules()) == 2
    ids = torch.randint(3, 200, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    llama = AutoModelForCausalLM.from_pretrained(make_tiny(tmp_path / "llama", arch="llama"))
    assert fuse_activations(llama) == 0


def _padded_vocab_model(path, extra: int = 64, dominant: bool = True):
    """A tiny llama whose embedding has ``extra`` rows beyond its byte tokenizer (as Qwen2, Phi-3 and OLMo
    ship), untied; with ``dominant`` the extra rows' logits dwarf every real token's."""
    from transformers import LlamaConfig

    from proxrl.lm.tiny import byte_tokenizer

    tok = byte_tokenizer()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok) + extra, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if dominant:
        with torch.no_grad():
            model.lm_head.weight[len(tok):] *= 100.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), len(tok)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_embedding_rows_beyond_the_tokenizer_are_never_sampled_or_scored(tmp_path, finetune):
    """Rows beyond the tokenizer are no tokens: the sampler never draws them (it drew them, the tokenizer
    decoded them to nothing, rewards never saw them) and the log-probs are those of the tokenizer's ids
    alone — a plain forward of each sequence, log-softmax over the first len(tokenizer) logits."""
    from proxrl.lm.config import PPOConfig
    from proxrl.lm.rollout import TokenRollouts

    path, n = _padded_vocab_model(tmp_path / "padded")
    cfg = PPOConfig(policy=path, prompts="x", reward="x:y", finetune=finetune, response_length=6, batch_size=4,
                    dtype="float64", temperature=1.0)
    pol = build_policy(path, cfg)
    tr = TokenRollouts(pol, cfg)
    r = tr.generate(["hello", "abc", "x y", "q"], 0)
    assert int(r.response_ids.max()) < n
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    lp = tr.logp(r)
    for i in range(len(r)):
        q = r.query_ids[i][r.query_mask[i].bool()].tolist()
        a = r.response_ids[i][r.response_mask[i].bool()].tolist()
        logits = plain(input_ids=torch.tensor([q + a])).logits[0, len(q) - 1:-1, :n]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(a)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, :len(a)], ref.detach(), atol=1e-10, rtol=0)


def test_a_tokenizer_with_ids_beyond_the_embedding_is_one_line(tmp_path):
    """A tokenizer holding tokens the model has no embedding row for was an IndexError at the first prompt
    holding one (a device-side assert on CUDA): now one ConfigError line at load, naming both sizes."""
    from proxrl.errors import ConfigError
    from proxrl.lm.tiny import byte_tokenizer

    path = make_tiny(tmp_path / "m")
    tok = byte_tokenizer()
    tok.add_tokens(["<extra1>", "<extra2>"])
    tok.save_pretrained(path)
    with pytest.raises(ConfigError, match="261 tokens but the model's embedding has 259 rows"):
        build_policy(str(path), ModelOptions(finetune="full"))


def test_the_pad_is_none_of_the_generation_configs_stop_ids(tmp_path):
    """Qwen2.5-Instruct pads with <|endoftext|>, which its generation config also stops at (eos_token_id
    [<|im_end|>, <|endoftext|>]); proxrl kept that pad and dropped it from the stop ids, so responses ran on
    past it. Now the pad is none of the stop ids, every stop id of the generation config stops a response,
    and none appears inside one."""
    from transformers import LlamaConfig

    from proxrl.lm.config import PPOConfig
    from proxrl.lm.rollout import TokenRollouts
    from proxrl.lm.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    eot, eot_text = tok.convert_tokens_to_ids("<|eot|>"), tok.convert_tokens_to_ids("</s>")
    tok.eos_token, tok.pad_token, tok.bos_token = "<|eot|>", "</s>", None
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), eos_token_id=[eot, eot_text], pad_token_id=eot_text)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ppo = PPOConfig(policy=str(tmp_path), prompts="x", reward="x:y", finetune="full", response_length=40)
    tr = TokenRollouts(build_policy(str(tmp_path), ppo), ppo)
    assert tr.stop_ids == sorted([eot, eot_text]) and tr.pad_id not in tr.stop_ids
    r = tr.generate([f"p{i}" for i in range(64)], 1)
    ends = set()
    for ids, m, stopped in zip(r.response_ids, r.response_mask, r.stopped):
        real = ids[m.bool()].tolist()
        assert not set(real[:-1]) & {eot, eot_text}
        if stopped:
            ends.add(real[-1])
    assert ends == {eot, eot_text}


def test_sft_at_a_huge_lr_warns_on_a_padded_vocabulary_too(tmp_path, capsys):
    """The SFT loss is over the tokenizer's ids (the logits are cut to them): its uniform-guess level is
    ln(len(tokenizer)), not ln(embedding rows) — with 64 padded rows the diverged loss 5.557 = ln 259 sat
    below 0.98·ln 323 and the warning never came."""
    from proxrl.lm.config import SFTConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.sft_trainer import sft

    path, n = _padded_vocab_model(tmp_path / "padded", dominant=False)
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": f"answer {i}"} for i in range(8)])
    sft(SFTConfig(model=path, data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "sft"), dtype="float64", lr=1e6,
                  epochs=2, finetune="full"), log=lambda *_: None)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: lr:")]
    assert len(warnings) == 1 and "ln(vocab) = 5.557" in warnings[0]


def test_sft_greedy_samples_never_choose_rows_beyond_the_tokenizer(tmp_path):
    """SFT's greedy samples (samples.md) come from transformers' generate, not proxrl's sampler: rows beyond
    the tokenizer are suppressed there too (with dominant padded rows every greedy token was one of them,
    decoded to an empty answer)."""
    import re

    from proxrl.lm.config import SFTConfig
    from proxrl.lm.data import write_jsonl
    from proxrl.lm.sft_trainer import sft

    path, n = _padded_vocab_model(tmp_path / "padded")
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": f"answer {i}"} for i in range(4)])
    sft(SFTConfig(model=path, data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "sft"), lr=1e-6, epochs=1,
                  max_response_length=8, finetune="full"), log=lambda *_: None)
    answers = re.findall(r"\*\*response\*\* \(reward [^)]*\): (.*)", (tmp_path / "sft" / "samples.md").read_text())
    assert len(answers) == 3 and all(answers), answers
