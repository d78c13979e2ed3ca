"""The steering engine on stories260K: the invariants (Swap and Weight with every score 1 change nothing), hooks
removed whatever happens, `apply` is `steer`, batches equal single runs, a prompted steer runs behind its prompt; and
`layer_charts` embeds only what each panel plots."""
import pytest
import torch

from saealign.methods import Clamp, Swap, Weight
from saealign.steering import apply_activation, generate, layer_charts, steer


@pytest.mark.parametrize("method_class", [Swap, Weight])
def test_every_score_one_changes_nothing(model, sae, method_class):
    "σ(h ⊙ 1) = σ(h): the same latents, the same generation (the SAE in error mode)."
    method = method_class(torch.ones(sae.cfg.d_sae))
    h = torch.randn(4, sae.cfg.d_sae)
    acts = apply_activation(sae, h)
    assert torch.equal(method.edit(sae, h, acts), acts)
    steered = generate(model, sae, "Once upon a time", method, max_new_tokens=12, do_sample=False)[0]
    plain = generate(model, None, "Once upon a time", max_new_tokens=12, do_sample=False)[0]
    assert steered.tokens == plain.tokens and set(steered.n_changed) == {0}


def test_hooks_are_removed_even_when_the_body_raises(model, sae):
    tokens = model.to_tokens("Once upon a time")
    with torch.no_grad():
        before = model(tokens)
    with pytest.raises(RuntimeError, match="inside"):
        with steer(model, sae, Clamp(torch.rand(sae.cfg.d_sae), value=50.0)):
            raise RuntimeError("inside")
    assert not model.acts_to_saes
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


def test_apply_is_steer(model, sae):
    method = Clamp(torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(1)), value=20.0)
    tokens = model.to_tokens("Once upon a time")
    with torch.no_grad():
        with steer(model, sae, method):
            by_steer = model(tokens)
        with method.apply(model, sae) as record:
            by_apply = model(tokens)
        plain = model(tokens)
    assert torch.equal(by_apply, by_steer) and not torch.equal(by_apply, plain) and len(record.n_changed) == 1


def test_a_batch_equals_its_prompts_run_alone(model, sae):
    method = Clamp(torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0)), value=3.0)
    prompts = ["Once upon a time", "Tim was sad"]  # the same length: one batch of two rows, not two groups
    assert len({len(model.to_tokens(p)[0]) for p in prompts}) == 1
    together = generate(model, sae, prompts, method, max_new_tokens=10, do_sample=False)
    alone = [generate(model, sae, p, method, max_new_tokens=10, do_sample=False)[0] for p in prompts]
    assert [g.tokens for g in together] == [g.tokens for g in alone]


def test_a_prompted_steer_generates_behind_its_own_prompt(model, sae):
    "`generate` puts a method's `prefix` before the prompt unless told otherwise, as `side_by_side` and the grid do."
    from saealign.additive import TopicSteer
    axis = torch.zeros(sae.cfg.d_in)
    axis[0] = 1.0
    steer = TopicSteer(torch.ones(sae.cfg.d_sae), axis, positions="generation", prefix="Tom had a big red ball. ")
    run = lambda **kw: generate(model, sae, "The", steer, max_new_tokens=12, seed=0, **kw)[0].tokens
    assert run() == run(prefix=steer.prefix) != run(prefix="")
    assert generate(model, None, "Once upon a time", steer, max_new_tokens=12, seed=0)[0].tokens == \
        generate(model, None, "Once upon a time", max_new_tokens=12, seed=0)[0].tokens  # no SAE: the unmodified model


def test_layer_charts_hold_only_what_each_plots():
    rows = [dict(method=m, text=0, label=label, position=p, token="a long token " * 5, n_changed=p, error_diff=0.1 * p,
                 contamination=0.2) for m in ("Swap", "Clamp") for label in ("aligned", "unaligned") for p in range(3)]
    spec = layer_charts(rows).to_dict()
    assert [set(spec["datasets"][c["data"]["name"]][0]) for c in spec["hconcat"]] == [
        {"method", "n_changed"}, {"method", "error_diff"}, {"label", "method", "contamination"}]
    one_label = [r for r in rows if r["label"] == "aligned"]
    assert len(layer_charts(one_label).to_dict()["hconcat"]) == 2  # no contamination panel to compare labels on
