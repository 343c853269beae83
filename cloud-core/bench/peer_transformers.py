"""The peer figure for `cloud-core bench`: Hugging Face transformers on the CPU, f32, same
prompt lengths, steps and thread count as the machine's cores — for `--shape qwen2-1.5b`
(DeepSeek-R1-Distill-Qwen-1.5B's shape, random weights) or, with `--model DIR`, for a
checkpoint directory such as the demo model (`cloud-core bench --model DIR`).

Run outside CI (torch is large):
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install -r cloud-core/fixtures/parity/requirements.txt
    /tmp/refvenv/bin/python cloud-core/bench/peer_transformers.py [--steps 16] [--prompt 128] [--model DIR]
"""

import argparse
import os
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--model", help="checkpoint directory instead of random Qwen2-1.5B weights")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    t = time.time()
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        cfg = model.config
    else:
        model = Qwen2ForCausalLM(cfg).float().eval()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"model built in {time.time() - t:.1f} s")
    vocab = cfg.vocab_size
    ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(args.prompt)]])
    print("| measurement | tokens | seconds | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        t = time.time()
        model(ids, use_cache=True)
        s = time.time() - t
        print(f"| prefill, batch 1, {args.prompt}-token prompt | {args.prompt} | {s:.2f} | {args.prompt / s:.1f} |")
        for b in [int(x) for x in args.batches.split(",")]:
            prompt = ids[:, :32].repeat(b, 1)
            out = model(prompt, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.time()
            for _ in range(args.steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            s = time.time() - t
            print(f"| decode, batch {b} (after a 32-token prompt) | {b * args.steps} | {s:.2f} | {b * args.steps / s:.2f} |")


if __name__ == "__main__":
    main()
