"""Loading causal LMs and tokenizers, tokenising prompts, and the fine-tuning modes.

Named choices (DETAILS LM side), each pinned by a test in ``tests/test_lm_model.py``:

* LM-1 **pad ≠ eos.** When a tokenizer has no pad token, or pads with EOS or another token its model's
  generation config stops at, an existing special token that is none of them (unk, then bos) becomes the
  pad; only if there is none is ``<|pad|>`` added (embeddings resized).
  Masks are never derived from the pad id anyway: responses are cut at their first stop token.
* Only safetensors weights are read (a ``pytorch_model.bin`` would be unpickled); ``trust_remote_code``
  stays off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..run import checkpoint
from ..run.resumable import check_finished
from .config import ModelOptions

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
RUN_CONFIG = "config.json"


def read_run_config(path: str | Path) -> Optional[dict]:
    """The config of a proxrl run directory (``config.json`` with a ``stage`` key), or None."""
    cfg = Path(path) / RUN_CONFIG
    if not cfg.is_file():
        return None
    try:
        obj = json.loads(cfg.read_text())
    except ValueError:
        return None
    if not (isinstance(obj, dict) and "stage" in obj):
        return None
    for key, kind, want in (("stage", str, "a string"), ("base_model", str, "a string"), ("config", dict, "an object")):
        if not isinstance(obj.get(key), kind):  # a run's config.json edited by hand: one line, not a KeyError
            raise CheckpointError(f"{cfg}: '{key}' must be {want} in a proxrl run's config.json, got "
                                  f"{type(obj.get(key)).__name__} (written by proxrl; was it edited?)")
    if not isinstance(obj.get("run_dir", ""), str):
        raise CheckpointError(f"{cfg}: 'run_dir' must be a string in a proxrl run's config.json, got "
                              f"{type(obj['run_dir']).__name__} (written by proxrl; was it edited?)")
    if isinstance(obj.get("base_model"), str):  # the run moved, its base model with it: found again
        from ..run.rundir import relocate

        obj["base_model"] = relocate(obj["base_model"], obj.get("run_dir"), path)
    return obj


def check_model_source(spec: str, field: str = "model") -> None:
    """Fail fast, in one line, on a model that is neither on this machine nor reachable: a local path that does
    not exist, or a hub name that is not in the Hugging Face cache while the hub cannot be reached (offline,
    ``HF_HUB_OFFLINE``) or has no such repository — instead of transformers' retries (51 s) and traceback."""
    p = Path(spec).expanduser()
    if p.exists():
        return
    fix = "give a local model directory, a .gguf file or a proxrl run directory"
    if p.suffix == ".gguf" or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise ConfigError(field, f"no such file or directory: {spec}", fix)
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # no huggingface_hub: transformers reports the problem itself
        return
    try:
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
    except ValueError:  # not a valid repo id
        raise ConfigError(field, f"{spec!r} is not a local path and not a valid Hugging Face model name", fix) from None
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(field, f"{spec!r} is not a local path and not in the Hugging Face cache (HF_HUB_OFFLINE is set)", fix)
    try:
        HfApi().model_info(spec, timeout=10)
    except GatedRepoError:
        return  # exists; from_pretrained says what access it needs
    except RepositoryNotFoundError:
        raise ConfigError(field, f"{spec!r} is not a local path and no such model is on the Hugging Face hub", fix) from None
    except Exception as e:  # noqa: BLE001 - connection errors of requests/httpx, timeouts
        raise ConfigError(field, f"{spec!r} is not a local path, not in the Hugging Face cache, and the hub cannot be "
                          f"reached ({str(e).splitlines()[0] if str(e) else type(e).__name__})", fix) from None


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    run = read_run_config(spec)
    if run is not None:
        return load_tokenizer(run["base_model"])
    p = Path(spec)
    check_model_source(spec)
    try:
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot load a tokenizer from {spec!r}: {str(e).splitlines()[0]}") from None


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32):
    """A plain ``AutoModelForCausalLM`` from a local directory, a hub name (offline: from the local cache),
    a ``.gguf`` file (de-quantised by transformers), or a proxrl SFT/PPO run directory (its trained weights
    loaded into its base model; a LoRA adapter is merged so the result is again a plain model)."""
    from transformers import AutoModelForCausalLM

    run = read_run_config(spec)
    if run is not None:
        return load_run_policy(spec, run, dtype)
    p = Path(spec)
    check_model_source(spec)
    try:
        if p.suffix == ".gguf":
            if not p.is_file():
                raise ConfigError("model", f"no such GGUF file: {spec}")
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
        else:
            # safetensors only: a pytorch_model.bin would be unpickled by torch.load (issue 5, safe loading)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot load a causal LM from {spec!r}: {str(e).splitlines()[0]}") from None
    fuse_activations(model)
    return model.eval()


def fuse_activations(model: nn.Module) -> int:
    """Swap Python-composed tanh-GELU modules (``gelu_new`` of GPT-2 and its descendants, ``gelu_fast``) for
    transformers' own ``GELUTanh`` — torch's fused ``gelu(approximate="tanh")``: the same function
    0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) in one kernel instead of eight elementwise ones, which on a small
    GPT-2 are the costliest ops of a training step. Results differ by float rounding only. Models with other
    activations (SiLU in Llama/SmolLM2, exact GELU) are untouched. Returns the number of modules swapped."""
    try:
        from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
    except ImportError:  # an older transformers without these classes: nothing to swap
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def load_run_policy(run_dir: str | Path, run: dict, dtype: torch.dtype, merge: bool = True, with_tokenizer: bool = False):
    """The trained policy of an SFT/PPO run directory: its base model with the run's trained weights (a
    LoRA adapter merged unless ``merge=False``, which returns the peft model). With ``with_tokenizer`` also
    the tokenizer (pad token as in training)."""
    opts = ModelOptions(**{k: v for k, v in run["config"].items() if k in ModelOptions.__dataclass_fields__})
    tensors, state = checkpoint.load(Path(run_dir) / "checkpoints")  # first: a run without one fails before any loading
    check_finished(run_dir, state)  # an SFT run stopped before its end is finished first (--resume)
    base = load_causal_lm(run["base_model"], dtype)
    tok = load_tokenizer(run["base_model"])
    ensure_pad_token(tok, base)
    freeze(base)
    lm = apply_finetune(base, opts)
    prefix = "policy.lm."
    own = {k[len(prefix):]: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items() if k.startswith(prefix)}
    if not own:
        raise CheckpointError(f"{run_dir}: checkpoint holds no policy weights")
    load_into(lm, own)
    if opts.finetune == "lora" and merge:
        lm = lm.merge_and_unload()
    freeze(lm)
    return (lm.eval(), tok) if with_tokenizer else lm.eval()


def load_into(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected:
        raise CheckpointError(f"checkpoint tensors do not fit the model: {unexpected[:3]}")


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config (None if it declares none)."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_fits_context(model, max_prompt_length: int, response: int, response_field: str, eos: int = 0) -> None:
    """Checked before any work, for every stage: a prompt of ``max_prompt_length`` tokens plus a response of
    ``response`` tokens (plus ``eos`` = 1 when the stage appends a stop token) must fit the model's context;
    past it, learned position embeddings index out of their table (a traceback mid-run) and rotary ones
    run where the model was never trained. A one-line ConfigError naming ``response_field``."""
    n_ctx = context_length(model)
    if n_ctx is not None and max_prompt_length + response + eos > n_ctx:
        flag = response_field.replace("_", "-")
        raise ConfigError(response_field, f"max_prompt_length {max_prompt_length} + {response_field} {response}"
                          + (" + the EOS token" if eos else "") + f" exceeds the model's context of {n_ctx} tokens",
                          f"keep their sum ≤ {n_ctx - eos} (--max-prompt-length, --{flag})")


def ensure_pad_token(tokenizer, model=None) -> int:
    """Make the pad token distinct from EOS and every stop id of the model (DETAILS LM-1); pad on the left.
    Returns the pad id. With the ``model``, also fit its vocabulary to the tokenizer's (:func:`fit_vocabulary`)."""
    if model is not None:
        fit_vocabulary(tokenizer, model)  # before a pad token is added
    pad = _pad_token(tokenizer, model)
    if model is not None:
        model.proxrl_vocab = len(tokenizer)  # the actions: the tokenizer's ids (a pad it added included)
    return pad


def fit_vocabulary(tokenizer, model) -> None:
    """Token ids and embedding rows must match. A tokenizer with ids the model has no embedding row for (a
    tokenizer of another model, tokens added without resizing) is a one-line ConfigError — an id ≥ the rows
    was an IndexError (a device-side assert on CUDA) at the first prompt holding it. Rows beyond the
    tokenizer (the embedding padded to a multiple, as Qwen2, Phi-3 and OLMo ship) are no tokens: the
    policy never samples or scores them — :func:`token_logits` cuts the logits to the tokenizer's ids, in
    the sampler and in every log-prob (they were drawn, decoded to nothing, and invisible to rewards)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError("model", f"its tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                          f"{rows} rows: ids {rows}..{len(tokenizer) - 1} have no embedding (the tokenizer of "
                          "another model, or tokens added without resizing the model)",
                          "use the model's own tokenizer, or save the model after "
                          "model.resize_token_embeddings(len(tokenizer))")


def token_logits(model, logits: Tensor) -> Tensor:
    """``logits`` ``[..., V]`` of ``model`` cut to the ids of its tokenizer (``[..., n]``, n ≤ V) when the
    embedding has rows beyond it (:func:`fit_vocabulary`); unchanged otherwise."""
    n = getattr(model, "proxrl_vocab", None)
    return logits[..., :n] if isinstance(n, int) and n < logits.shape[-1] else logits


def _pad_token(tokenizer, model=None) -> int:
    tokenizer.padding_side = "left"
    # every stop token, not only the tokenizer's EOS: Qwen2.5-Instruct pads with <|endoftext|>, which its
    # generation config also stops at (stop_token_ids drops the pad: responses ran on past it)
    stops = {tokenizer.eos_token_id} | generation_stop_ids(model)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stops:
        return tokenizer.pad_token_id
    for cand in (tokenizer.unk_token, tokenizer.bos_token):
        if cand is not None and tokenizer.convert_tokens_to_ids(cand) not in stops:
            tokenizer.pad_token = cand
            return tokenizer.pad_token_id
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        add_token_rows(model, len(tokenizer))
    return tokenizer.pad_token_id


@torch.no_grad()
def add_token_rows(model: nn.Module, n: int) -> None:
    """Grow the vocabulary to ``n`` tokens, each new row of the input and output embeddings (and of an output
    bias) the mean of the existing ones — deterministic, so that every load of a base model (training, a
    resume, ``proxrl export`` of a LoRA run, whose checkpoint holds only the adapter) gets the same rows;
    transformers' own init draws them from the global RNG. The mean row is the usual choice for a new token
    (its logit is the average logit, Hewitt 2021, "Initializing new word embeddings")."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(n, mean_resizing=False)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    seen = set()
    for layer in (m for m in layers if m is not None):
        for t in (layer.weight, getattr(layer, "bias", None)):
            if isinstance(t, torch.Tensor) and id(t) not in seen and t.shape[0] == n:  # tied: once
                seen.add(id(t))
                t[old:] = t[:old].mean(0)


def stop_token_ids(tokenizer, model=None, field: str = "model") -> list[int]:
    """EOS of the tokenizer plus those of the model's generation config (chat models stop at end-of-turn).
    None at all: a one-line ConfigError naming ``field`` (the option that named the model)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= generation_stop_ids(model)
    ids.discard(tokenizer.pad_token_id)
    if not ids:
        raise ConfigError(field, "its tokenizer has no EOS token and its generation config names none, so "
                          "responses could never stop", "use a model whose tokenizer sets eos_token")
    return sorted(ids)


def generation_stop_ids(model) -> set[int]:
    """The ids the model's generation config stops at (``eos_token_id``: an id or a list); none without one."""
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        return {extra}
    return {int(i) for i in extra} if extra else set()


def use_chat_template(tokenizer, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise ConfigError("chat_template", "is 'on' but the tokenizer has no chat template")
    return has if mode == "auto" else mode == "on"


def encode_prompt(tokenizer, text: str, chat: bool, max_len: int) -> list[int]:
    """Token ids of one prompt (chat-formatted with the generation prompt when ``chat``), keeping the last
    ``max_len`` tokens. A :class:`~proxrl.lm.data.Conversation` is formatted from its own turns; without the
    chat template (``chat_template`` off) it is its readable text."""
    if chat:
        turns = getattr(text, "messages", None) or [{"role": "user", "content": str(text)}]
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template's own refusal (jinja2 TemplateError, ...): one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError("chat_template", f"the tokenizer's chat template refused a prompt ({first}): "
                              f"{str(text)[:60]!r}", "give the turns the template accepts, or pass "
                              "--chat-template off") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(str(text))["input_ids"]
        plain = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        if len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id and ids[len(ids) - 1 - len(plain):-1] == plain:
            ids = ids[:-1]  # a tokenizer that appends EOS (add_eos_token): a prompt to answer does not end the text
    if not ids:  # a fully padded row: the first token would be drawn from (and trained on) a masked position
        raise ConfigError("prompt", f"{str(text)[:60]!r} tokenises to no token at all (no BOS is added), so a "
                          "causal LM has nothing to condition the first response token on",
                          "give every prompt some text, or use a chat template (--chat-template on)")
    return ids[-max_len:]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``[B, L]`` ids and mask, padded on the left."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int, length: Optional[int] = None) -> tuple[Tensor, Tensor]:
    L = length if length is not None else max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:L]
        if s:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return ids, mask


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (the one whose length is ``num_hidden_layers``)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise ConfigError("finetune", "cannot find the transformer blocks of this model", "use --finetune lora or full")


def check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Every ``--lora-target`` names modules of the model (peft's rule: the full name, or its last dotted
    parts); otherwise one ConfigError line with some of the model's linear-layer names."""
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not t or not any(n == t or n.endswith("." + t) for n in names):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)
                             or type(m).__name__ == "Conv1D"})
            raise ConfigError("lora_target", f"the model has no module named {t!r}",
                              "choose from its linear layers, e.g. " + ", ".join(linear[:8]) + ", or 'all-linear'")


def checkpoint_activations(model: nn.Module) -> int:
    """Activation checkpointing of every transformer block: under autograd a block keeps only its inputs and
    recomputes its activations in backward (``torch.utils.checkpoint``, non-reentrant), so a training forward
    holds about one block's activations instead of every block's, for about one more forward of compute.
    Each block's ``forward`` is wrapped in place — parameter names, LoRA, checkpoints and export are
    unchanged — and no-grad forwards (sampling, scoring, the reference) run as before. It works in eval mode,
    which proxrl's models never leave (transformers' ``gradient_checkpointing_enable`` acts only in train
    mode). Returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    _, blocks = transformer_blocks(model)
    n = 0
    for block in blocks:
        if getattr(block, "_proxrl_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._proxrl_checkpointed = True
        n += 1
    return n


def apply_finetune(model: nn.Module, opts: ModelOptions) -> nn.Module:
    """Mark what trains: LoRA adapters (returns a peft model), all weights, or the last blocks; with
    ``gradient_checkpointing`` the blocks recompute their activations in backward."""
    model = _mark_trainable(model, opts)
    if getattr(opts, "gradient_checkpointing", False):
        checkpoint_activations(model)
    return model


def _mark_trainable(model: nn.Module, opts: ModelOptions) -> nn.Module:
    if opts.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        target = opts.lora_target if opts.lora_target == "all-linear" else [t.strip() for t in opts.lora_target.split(",")]
        if target != "all-linear":
            check_lora_targets(model, target)
        cfg = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=0.0, bias="none",
                         target_modules=target, task_type="CAUSAL_LM")
        freeze(model)
        peft_model = get_peft_model(model, cfg)
        return peft_model.eval()
    if opts.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.eval()
    if opts.finetune == "layers":
        freeze(model)
        _, blocks = transformer_blocks(model)
        if opts.train_layers > len(blocks):
            raise ConfigError("train_layers", f"the model has {len(blocks)} transformer blocks, got {opts.train_layers}",
                              f"pass --train-layers {len(blocks)} or less (or --finetune full)")
        k = opts.train_layers
        for block in list(blocks)[len(blocks) - k:]:
            for p in block.parameters():
                p.requires_grad_(True)
        return model.eval()
    raise ConfigError("finetune", f"must be lora, full or layers, got {opts.finetune!r}")


