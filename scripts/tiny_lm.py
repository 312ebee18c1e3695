"""Build a tiny causal LM, its tokenizer and its corpus offline, to try the language-model path:

    python scripts/tiny_lm.py DIR [--arch llama|opt|mixtral|qwen2_moe|deepseek_v3] [--steps 300]
    prunebench model=hf_causal_lm model.name=DIR/model dataset=text dataset.path=DIR/corpus.txt \\
        criterion=wanda sparsity=0.5

DIR/corpus.txt is a generated toy English (prunebench.lm.tiny); DIR/model a LLaMA-, OPT-, Mixtral-,
Qwen2-MoE- or DeepSeek-V3-architecture decoder trained on its first 90% of lines (the text dataset's training split),
saved with save_pretrained together with a byte-level BPE tokenizer trained on the corpus.
"""

import argparse
import time

from prunebench.lm import tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir")
    parser.add_argument("--arch", choices=tiny.ARCHS, default="llama")
    parser.add_argument("--sentences", type=int, default=6000, help="sentences in the corpus")
    parser.add_argument("--steps", type=int, default=300, help="training steps (16 windows each)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", help="train on this UTF-8 text file instead of the generated corpus")
    parser.add_argument("--vocab-size", type=int, default=384, help="of the byte-level BPE tokenizer")
    parser.add_argument("--seq-len", type=int, default=64, help="training window length")
    parser.add_argument("--heads", type=int, default=4, help="attention (query) heads")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key-value heads (fewer than --heads: grouped-query attention; default: --heads)")
    parser.add_argument("--experts", type=int, default=8, help="routed experts per block (MoE archs)")
    parser.add_argument("--top-k", type=int, default=2, help="experts each token is routed to (MoE archs)")
    args = parser.parse_args()
    started = time.perf_counter()
    text = open(args.corpus, encoding="utf-8").read() if args.corpus else None
    built = tiny.build(args.dir, args.arch, args.sentences, args.steps, args.width, args.layers, args.seed, text,
                       args.vocab_size, args.seq_len, kv_heads=args.kv_heads or args.heads, heads=args.heads,
                       experts=args.experts, top_k=args.top_k)
    print(f"wrote {built['corpus']} ({built['tokens']:,} training tokens) and {built['model']} ({args.arch}, "
          f"{built['params']:,} parameters, last training loss {built['train_loss']:.3f}) in "
          f"{time.perf_counter() - started:.0f} s")
    print(f"try: prunebench model=hf_causal_lm model.name={built['model']} dataset=text "
          f"dataset.path={built['corpus']} criterion=wanda sparsity=0.5")


if __name__ == "__main__":
    main()
