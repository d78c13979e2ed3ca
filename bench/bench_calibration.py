"""What calibrating a new topic costs on Gemma 3 270M for the default steer (budget: 60 s of CPU on two cores), what
training its learned topic vector costs (03e, "a few minutes"), and the generation cost per token of each
protection beside the plain steer, measured side by side.

Run: `.venv/bin/python bench/bench_calibration.py` (also in `make bench`). The model, SAE, reference set and
acceptability classifier load from the cache first (not timed); calibration runs with its file cache off, so
every repeat measures a new topic.
"""
from benchlib import interleaved_best_of, options, timed, torch_inference

import time

from saealign.acceptability import load_acceptability
from saealign.additive import TopicSteer
from saealign.calibration import CALIBRATION_STRENGTHS, CALIBRATION_TOKENS, DEFAULT_METHOD, TUNING_PROMPTS, calibrate
from saealign.embeddings import load_embedder
from saealign.models import load_model
from saealign.reference import default_reference
from saealign.saes import load_sae
from saealign.scoring import topic_file
from saealign.additive import TopicInputs
from saealign.learned import LEARNING, learn_vector
from saealign.registry import make_method
from saealign.steering import generate

BUDGET_CPU_S = 60.0


def main():
    args = options(tokens=32, repeats=2)
    torch_inference()
    model = load_model()
    sae, embedder, acceptability = load_sae(model=model), load_embedder(), load_acceptability()
    reference = default_reference(model, sae, embedder)
    texts = topic_file("general")["astronomy"]["align"]  # a topic no chapter tunes or evaluates on
    inputs = TopicInputs(model, sae, reference, texts, embedder, cache_dir=False)  # a new topic: nothing kept yet
    (align, ref), means_s = timed(lambda: inputs.means)
    plain = TopicSteer.from_means(inputs.scores, align, ref)
    default = make_method(DEFAULT_METHOD, inputs, strength=1.0)  # its direction, positions and prefix; calibrated below
    wall, cpu = [], []
    for _ in range(args.repeats):
        start = time.process_time()
        result, seconds = timed(lambda: calibrate(model, sae, default, texts, embedder=embedder,
                                                  acceptability=acceptability, cache_dir=False))
        wall.append(seconds)
        cpu.append(time.process_time() - start)
    print(f"\ncalibration of a new topic ({DEFAULT_METHOD}): {len(TUNING_PROMPTS)} tuning prompts × "
          f"{len(CALIBRATION_STRENGTHS)} strengths × {CALIBRATION_TOKENS} tokens in one batch (best of {args.repeats})")
    print(f"  wall {min(wall):.1f} s, CPU {min(cpu):.1f} s (budget {BUDGET_CPU_S:.0f} s of CPU: "
          f"{min(cpu) / BUDGET_CPU_S:.2f}× the budget); the topic's activation means first: {means_s:.1f} s; chosen "
          f"strength {result.strength}")
    start = time.process_time()
    learned, seconds = timed(lambda: learn_vector(model, sae, texts, result.strength * default.direction,
                                                  cache_dir=False, progress=False, **LEARNING))
    print(f"training the topic's learned vector (03e, {LEARNING['steps']} steps of {LEARNING['batch']} rows, "
          f"{learned.n_candidates} candidate tokens): wall {seconds:.1f} s, CPU {time.process_time() - start:.1f} s")
    prompt = "The best way to spend a weekend is"
    steers = {"TopicSteer (fixed)": plain, "decay": TopicSteer.from_means(inputs.scores, align, ref, half_life=16.0),
              "generation only": TopicSteer.from_means(inputs.scores, align, ref, positions="generation"),
              "lift": TopicSteer.from_means(inputs.scores, align, ref, lift=True)}
    runs = {name: lambda s=s: generate(model, sae, prompt, s, max_new_tokens=args.tokens, do_sample=False)
            for name, s in steers.items()}
    runs["instructed"] = lambda: generate(model, sae, prompt, default, max_new_tokens=args.tokens, do_sample=False,
                                          prefix=default.prefix)  # behind its prompt: a longer first pass
    runs["no SAE"] = lambda: generate(model, None, prompt, max_new_tokens=args.tokens, do_sample=False)
    times = {k: v / args.tokens for k, v in interleaved_best_of(runs, args.repeats).items()}
    print(f"\nper-token cost, greedy, batch 1, {args.tokens} tokens (best of {args.repeats})")
    print(f"{'steer':<20} {'ms/token':>9} {'÷ fixed':>8}")
    for name, t in times.items():
        print(f"{name:<20} {t * 1e3:9.1f} {t / times['TopicSteer (fixed)']:8.3f}")


if __name__ == "__main__":
    main()
