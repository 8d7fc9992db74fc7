"""Generation speed: lmpipe (KV cache, and without) vs HF transformers ``generate``, and
lmpipe's masked-diffusion samplers on a model of the same dimensions.

One random AR model of the dimensions of ``conf/model/<preset>.yaml`` (Llama layout:
RMSNorm, RoPE, SwiGLU) and its export to ``LlamaForCausalLM`` (``lmpipe.hf``)
generate greedily from the same prompts: a fixed number of new tokens (no EOS on either
side), at batch 1 and batch 8. Generations alternate in chunks within one process; each
round gives a ratio, the table shows their median and range. Also reports whether the AR
generators produced the same tokens. The diffusion rows (a bidirectional model of the same
size, random weights, MASK = the last id) fill the same number of new positions with
``--diffusion-steps`` denoising steps: MDLM ancestral sampling (the model runs only on
steps that reveal a token) and LLaDA low-confidence remasking, as one block and as
semi-autoregressive blocks of a quarter of the reply. Their "same tokens" column is "-".

    python benchmarks/generate.py                      # tiny: 4L/4H/128d, block 128
    python benchmarks/generate.py --preset small       # 6L/6H/384d, block 512
    python benchmarks/generate.py --device cuda        # on a GPU (fp32)
"""

from __future__ import annotations

import argparse

import torch

from lmpipe.config import group_option
from lmpipe.hf import to_hf
from lmpipe.models import build_lm

from _common import interleaved_times, median, print_table

BASELINE = "HF generate (use_cache=True)"


def contenders(model, hf, diffusion, new_tokens: int, diffusion_steps: int) -> dict:
    """name -> generate(prompt) -> (B, new_tokens) new token ids."""

    def lmpipe(use_cache: bool):
        def generate(prompt):
            out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
            return out[:, prompt.shape[1] :]

        return generate

    def hf_generate(prompt):
        out = hf.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        return out[:, prompt.shape[1] :]

    def diffusion_sampler(sampler: str, block_length: int | None = None):
        def generate(prompt):
            out = diffusion.generate(
                prompt,
                new_tokens,
                temperature=0,
                steps=diffusion_steps,
                sampler=sampler,
                block_length=block_length,
            )
            return out[:, prompt.shape[1] :]

        return generate

    return {
        BASELINE: hf_generate,
        "lmpipe KV cache": lmpipe(True),
        "lmpipe no cache": lmpipe(False),
        f"diffusion ancestral, {diffusion_steps} steps": diffusion_sampler("ancestral"),
        f"diffusion confidence, {diffusion_steps} steps": diffusion_sampler("confidence"),
        f"diffusion confidence, blocks of {new_tokens // 4}": diffusion_sampler(
            "confidence", new_tokens // 4
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="conf/model/<preset>.yaml")
    parser.add_argument("--vocab", type=int, default=512, help="the demo mixtures' BPE size")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=6, help="timed generations per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--diffusion-steps", type=int, default=None, help="denoising steps (default: new tokens)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)

    layout = group_option("model", args.preset)
    if args.prompt_tokens + args.new_tokens > layout["block_size"]:
        parser.error(f"prompt + new tokens exceed block_size {layout['block_size']}")
    torch.manual_seed(0)
    model = build_lm(group_option("arch", "ar"), layout, args.vocab).eval()
    hf = to_hf(model).to(device)
    model.to(device)
    hf.generation_config.eos_token_id = None  # a fixed number of new tokens
    # Masked diffusion of the same dimensions (no eos_id given: all new positions filled).
    diffusion = build_lm(
        group_option("arch", "diffusion"),
        layout,
        args.vocab,
        {"pad": 0, "eos": 1, "mask": args.vocab - 1},
    ).eval()
    diffusion.to(device)
    steps = args.diffusion_steps or args.new_tokens
    generators = contenders(model, hf, diffusion, args.new_tokens, steps)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.get_num_threads()} CPU threads"
    print(
        f"{args.preset}: {layout['n_layer']}L/{layout['n_head']}H/{layout['d_model']}d, "
        f"{params / 1e6:.2f}M params, vocab {args.vocab}; greedy, prompt {args.prompt_tokens} "
        f"+ {args.new_tokens} new tokens; {args.rounds} rounds x {args.runs} generations; "
        f"torch {torch.__version__}, {where}"
    )

    table = []
    for batch in args.batch:
        prompts = [
            torch.randint(0, args.vocab, (batch, args.prompt_tokens), device=device)
            for _ in range(4)
        ]
        with torch.no_grad():
            outputs = {name: fn(prompts[0]) for name, fn in generators.items()}
        same = all(
            torch.equal(out, outputs[BASELINE])
            for name, out in outputs.items()
            if not name.startswith("diffusion")
        )
        per_round: dict[str, list[float]] = {name: [] for name in generators}
        ratios: dict[str, list[float]] = {name: [] for name in generators}
        for _ in range(args.rounds):
            with torch.no_grad():
                times = interleaved_times(
                    {
                        # .cpu() waits for the device: the whole generation is timed
                        name: lambda i, fn=fn, prompts=prompts: fn(prompts[i % len(prompts)]).cpu()
                        for name, fn in generators.items()
                    },
                    total=args.runs,
                    chunk=1,
                    warmup=1,
                )
            for name in generators:
                per_round[name].append(median(times[name]))
                ratios[name].append(median(times[BASELINE]) / median(times[name]))
        for name in generators:
            seconds = median(per_round[name])
            table.append(
                [
                    str(batch),
                    name,
                    f"{seconds * 1e3:.1f}",
                    f"{batch * args.new_tokens / seconds:,.0f}",
                    f"{median(ratios[name]):.2f}x",
                    f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}",
                    "-" if name.startswith("diffusion") else "yes" if same else "NO",
                ]
            )
    print_table(
        ["batch", "generator", "ms/generation", "tokens/s", "vs HF", "range", "same tokens"],
        table,
    )


if __name__ == "__main__":
    main()
