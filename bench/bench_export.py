"""Steered generation speed of one exported steer in three engines, side by side: saealign (transformer_lens with
the SAE spliced in), transformers with the exported vector's hook, and llama.cpp with it as a control vector
(when `saealign[llamacpp]` is installed).

Run: `make bench` (or `.venv/bin/python bench/bench_export.py`). Gemma 3 270M, greedy, batch 1; the vector is the
difference of means of the medical texts (a DiffMeans, so no reference set is needed). The three are interleaved
within each repetition and the best of `--repeats` is kept, so background load hits them alike.
"""
import importlib.util
import tempfile
from pathlib import Path

from benchlib import interleaved_best_of, options, torch_inference

import torch
from transformers import AutoModelForCausalLM

from saealign.export import LLAMACPP_INSTALL, apply, export_vector, llamacpp_greedy, llamacpp_model
from saealign.models import GENERAL_PROMPTS, gemma_folder, gguf_package, load_model
from saealign.saes import load_sae
from saealign.scoring import topic_texts
from saealign.additive import DiffMeans, activation_means
from saealign.steering import generate

PROMPT = "The patient was diagnosed with"


def main():
    args = options(tokens=32)
    torch_inference()
    n = args.tokens
    model = load_model("gemma-3-270m")
    sae = load_sae(model=model)
    method = DiffMeans.from_means(torch.ones(sae.cfg.d_sae), activation_means(model, sae, topic_texts("medical")),
                                  activation_means(model, sae, list(GENERAL_PROMPTS)))
    sv = export_vector(method, sae, model)
    hf = AutoModelForCausalLM.from_pretrained(gemma_folder(), dtype=torch.float32).eval()
    ids = model.to_tokens(PROMPT)

    def transformers_steered():
        with apply(sv, hf):  # every position, as llama.cpp
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    runs = {"saealign (transformer_lens + SAE)": lambda: generate(model, sae, PROMPT, method, max_new_tokens=n,
                                                                   do_sample=False),
            "transformers + hook": transformers_steered}
    with tempfile.TemporaryDirectory() as tmp:
        if importlib.util.find_spec("llama_cpp") is None:
            print(f"llama.cpp: not installed ({LLAMACPP_INSTALL})")
        else:
            gguf = gguf_package().assemble(Path(tmp) / "gemma-3-270m-Q4_K_M.gguf")
            llm = llamacpp_model(gguf, sv, n_ctx=256, n_threads=torch.get_num_threads())
            runs["llama.cpp + control vector (Q4_K_M)"] = lambda: llamacpp_greedy(llm, ids[0].tolist(), n)
        for run in runs.values():  # warm-up
            run()
        best = interleaved_best_of(runs, args.repeats)
    print(f"\nGemma 3 270M, steered at block {sv.layer} (|vector| {float(sv.vector.norm()):.0f}), {n} new tokens, greedy, "
          f"batch 1, prompt included, best of {args.repeats}")
    print(f"{'engine':<38} {'tokens/s':>9} {'s/64 tok':>9}")
    for name, seconds in best.items():
        print(f"{name:<38} {n / seconds:9.1f} {64 * seconds / n:9.2f}")


if __name__ == "__main__":
    main()
