"""bench.cw_misses: the soft-gate re-forward changes only the layers it names and leaves the model as it was."""

import torch

from bench import cw_misses
from detector import load_bundle
from detector.splits import bundle_splits


def test_soft_gates_multiply_by_p_and_are_undone_on_exit(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    model = bundle.model.eval()
    x = bundle_splits(bundle.meta).train.float_images(torch.arange(16))
    with torch.no_grad():
        before = model(x)
        path = model.forward_path(x)
        last = len(model.gated_layers()) - 1
        with cw_misses.soft_gates(model, last):
            soft = model.forward_path(x)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for i, (hard_layer, soft_layer) in enumerate(zip(path.layers, soft.layers)):
        if i < last:  # untouched layers compute exactly as before
            torch.testing.assert_close(soft_layer.hard, hard_layer.hard, rtol=0, atol=0)
        else:  # the named layer's gate is its soft p
            torch.testing.assert_close(soft_layer.hard, soft_layer.soft, rtol=0, atol=0)
    assert not torch.equal(soft.layers[last].hard, path.layers[last].hard)
    drops = cw_misses.soft_drops(model, x, (0, last), batch=5)  # batches of 5, 5, 5, 1
    assert set(drops) == {0, last} and drops[last].shape == (16,)
    drop = drops[last]
    expected = (
        before.log_softmax(1).max(1).values - soft.logits.log_softmax(1).gather(1, before.argmax(1, keepdim=True))[:, 0]
    )
    torch.testing.assert_close(torch.from_numpy(drop).float(), expected, rtol=1e-4, atol=1e-5)
