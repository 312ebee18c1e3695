"""A tiny causal LM, its tokenizer and its corpus, built offline (tests; scripts/tiny_lm.py).

The corpus is a generated toy English: sentences from a small grammar whose subjects and verbs
agree in number across a relative clause, with adjectives, places and times, so a model has
something to learn beyond word frequencies. The tokenizer is a byte-level BPE trained on it; the
model is a LLaMA- or OPT-architecture decoder, or a mixture of experts (Mixtral, Qwen2-MoE), from a
transformers config, trained briefly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Optional

NOUNS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("farmer", "farmers"), ("child", "children"),
         ("teacher", "teachers"), ("horse", "horses"), ("river", "rivers"), ("king", "kings"), ("robot", "robots"),
         ("sailor", "sailors"), ("wolf", "wolves"), ("doctor", "doctors"), ("painter", "painters")]
VERBS = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("finds", "find"), ("helps", "help"),
         ("watches", "watch"), ("knows", "know"), ("calls", "call"), ("feeds", "feed"), ("chases", "chase")]
INTRANSITIVE = [("sleeps", "sleep"), ("sings", "sing"), ("waits", "wait"), ("runs", "run"), ("laughs", "laugh")]
ADJECTIVES = ["old", "young", "small", "big", "quiet", "happy", "tired", "clever", "brave", "green", "red"]
PLACES = ["in the garden", "near the river", "on the hill", "at the market", "under the bridge", "in the town"]
TIMES = ["in the morning", "at night", "every day", "in winter", "after the rain"]


def noun_phrase(rng: random.Random, plural: bool) -> str:
    noun = rng.choice(NOUNS)[plural]
    adjective = f"{rng.choice(ADJECTIVES)} " if rng.random() < 0.5 else ""
    return f"the {adjective}{noun}"


def sentence(rng: random.Random) -> str:
    """Subject (maybe with a relative clause) and a verb that agrees with it."""
    plural = rng.random() < 0.5
    subject = noun_phrase(rng, plural)
    if rng.random() < 0.35:  # the verb must agree with the subject, not the nearer noun
        subject += f" that {noun_phrase(rng, rng.random() < 0.5)} {rng.choice(VERBS)[rng.random() < 0.5]}"
    if rng.random() < 0.6:
        words = f"{subject} {rng.choice(VERBS)[plural]} {noun_phrase(rng, rng.random() < 0.5)}"
    else:
        words = f"{subject} {rng.choice(INTRANSITIVE)[plural]}"
    if rng.random() < 0.4:
        words += f" {rng.choice(PLACES)}"
    if rng.random() < 0.3:
        words += f" {rng.choice(TIMES)}"
    return words[0].upper() + words[1:] + "."


def corpus(sentences: int, seed: int = 0) -> str:
    """Paragraphs of 3-8 sentences, one per line, blank lines between them (as WikiText)."""
    rng = random.Random(seed)
    paragraphs: List[str] = []
    count = 0
    while count < sentences:
        k = rng.randint(3, 8)
        paragraphs.append(" ".join(sentence(rng) for _ in range(k)))
        count += k
    return "\n\n".join(paragraphs) + "\n"


def train_tokenizer(text: str, vocab_size: int = 384):
    """A byte-level BPE with <s> prepended to every text, as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


ARCHS = ("llama", "opt", "mixtral", "qwen2_moe", "deepseek_v3")


def model_config(arch: str, vocab_size: int, width: int = 64, layers: int = 2, context: int = 256,
                 kv_heads: int = 4, heads: int = 4, experts: int = 8, top_k: int = 2):
    """A small decoder: LLaMA (RMSNorm, rotary positions, gated MLP; kv_heads < heads: grouped-query
    attention, as LLaMA-2-70B and Mistral), OPT (LayerNorm, learned positions, ReLU MLP), or a
    mixture of experts with LLaMA's attention: Mixtral (`experts` gated MLPs, the top_k chosen per
    token, their softmax weights renormalised over the chosen) or Qwen2-MoE (the same, weights not
    renormalised, plus a shared expert behind a sigmoid gate), or DeepSeek-V3 (multi-head latent
    attention; a dense first block; then a shared expert and `experts` routed ones in two groups,
    sigmoid affinities, a token's top_k from the one group (of two) whose two best score highest).
    Widths are multiples of 4, so every layer takes 2:4."""
    from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig, OPTConfig, Qwen2MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=context, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(intermediate_size=width * 3, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                           **common)
    if arch == "opt":
        return OPTConfig(ffn_dim=width * 4, word_embed_proj_dim=width, dropout=0.0, attention_dropout=0.0, **common)
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=width * 2, num_key_value_heads=kv_heads, num_local_experts=experts,
                             num_experts_per_tok=top_k, tie_word_embeddings=False, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(intermediate_size=width * 2, moe_intermediate_size=width * 2,
                              shared_expert_intermediate_size=width * 2, num_key_value_heads=kv_heads,
                              num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                              tie_word_embeddings=False, **common)
    if arch == "deepseek_v3":
        head, groups = width // heads, 2 if experts % 2 == 0 and experts >= 4 else 1
        return DeepseekV3Config(intermediate_size=width * 2, moe_intermediate_size=width * 2, n_routed_experts=experts,
                                num_experts_per_tok=top_k, n_shared_experts=1, n_group=groups, topk_group=1,
                                first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                                q_lora_rank=width // 2, kv_lora_rank=width // 2, qk_rope_head_dim=head // 2,
                                qk_nope_head_dim=head // 2, v_head_dim=head, num_key_value_heads=heads,
                                tie_word_embeddings=False, **common)
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")


class BiasBalancing:
    """DeepSeek-V3's auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3 report,
    §2.1.2): after each step, every router's e_score_correction_bias moves by `speed` towards the
    experts chosen less than the mean of the step and away from those chosen more."""

    def __init__(self, model, speed: float = 1e-3):
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.loads = {id(r): 0 for r in self.routers}
        self.speed = speed
        self.handles = [r.register_forward_hook(self.count) for r in self.routers]

    def count(self, router, args, output):
        import torch

        chosen = torch.bincount(output[2].reshape(-1).detach(), minlength=router.num_experts)
        self.loads[id(router)] = self.loads[id(router)] + chosen

    def step(self):
        for router in self.routers:
            load = self.loads[id(router)]
            router.e_score_correction_bias += self.speed * (load.float().mean() - load.float()).sign()
            self.loads[id(router)] = 0

    def remove(self):
        for handle in self.handles:
            handle.remove()


def train(model, tokens, steps: int, seq_len: int = 64, batch_size: int = 16, lr: float = 3e-3, seed: int = 0):
    """AdamW on random windows of the token stream, cosine lr; returns the last loss. A mixture of
    experts is balanced as it is trained (else a few experts take every token): by its
    load-balancing loss (config.router_aux_loss_coef), DeepSeek-V3 by its routers' biases."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    balancing = BiasBalancing(model)
    loss = None
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
        batch = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
        extra = {"output_router_logits": True} if getattr(model.config, "router_aux_loss_coef", 0) else {}
        loss = model(input_ids=batch, labels=batch, **extra).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            balancing.step()
    balancing.remove()
    model.eval()
    return float(loss.detach())


def build(out: Path | str, arch: str = "llama", sentences: int = 6000, steps: int = 300, width: int = 64,
          layers: int = 2, seed: int = 0, text: Optional[str] = None, vocab_size: int = 384,
          seq_len: int = 64, kv_heads: int = 4, heads: int = 4, experts: int = 8,
          top_k: int = 2) -> Dict[str, object]:
    """out/corpus.txt (the generated corpus, or `text`), and out/model: a tiny causal LM trained on
    its training split (all but the last 10% of lines), with its tokenizer (save_pretrained)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = corpus(sentences, seed) if text is None else text
    (out / "corpus.txt").write_text(text)
    tokenizer = train_tokenizer(text, vocab_size)
    torch.manual_seed(seed)
    config = model_config(arch, len(tokenizer), width, layers, kv_heads=kv_heads, heads=heads, experts=experts,
                          top_k=top_k)
    model = AutoModelForCausalLM.from_config(config)
    lines = text.splitlines(keepends=True)
    train_part = "".join(lines[:len(lines) - round(0.1 * len(lines))])  # dataset=text's test split: the rest
    tokens = torch.tensor(tokenizer(train_part)["input_ids"])
    loss = train(model, tokens, steps, seq_len=seq_len, seed=seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"model": out / "model", "corpus": out / "corpus.txt", "train_loss": loss,
            "params": sum(p.numel() for p in model.parameters()), "tokens": tokens.numel()}
