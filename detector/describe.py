"""Human-readable summary of a bundle (``pathguard info``)."""

from __future__ import annotations

from .bundle import Bundle


def describe_bundle(bundle: Bundle) -> str:
    m = bundle.meta
    test = m.get("metrics", {}).get("test", {})
    lines = [
        f"bundle      {bundle.path}",
        f"name        {m['name']} (version {m.get('model_version', '?')})",
        f"model       {m['arch']} {'gated' if m['gated'] else 'dense'}, input {tuple(m['input_shape'])}, "
        f"{len(m['classes'])} classes",
        f"dataset     {m.get('dataset', {}).get('name', '?')} "
        f"(fingerprint {m.get('dataset', {}).get('fingerprint', '?')[:12]})",
        f"trained by  {m.get('command', '?')}",
    ]
    if test:
        lines.append(
            f"test        accuracy {test.get('accuracy', float('nan')):.4f}, "
            f"executed FLOPs {test.get('flops_ratio', 1.0):.3f} of dense"
        )
    if m["gated"] and test.get("layer_density"):
        lines.append(
            f"gates       mean density {test['gate_density']:.3f}; per layer: "
            + ", ".join(f"{k} {v:.2f}" for k, v in test["layer_density"].items())
        )
        lines.append(
            f"paths       q(y|path) accuracy {test.get('path_head_accuracy', float('nan')):.4f}; "
            f"Hamming same class {test.get('hamming_same_class', float('nan')):.3f}, "
            f"other class {test.get('hamming_other_class', float('nan')):.3f}"
        )
    record, det = bundle.detector_record(), bundle.part("detector")
    if record is not None and det is not None:
        what = (
            f"ensemble, weights {det[1]['weights']}"
            if det[1].get("weights")
            else f"{record.classifier} on {record.feature_groups}"
        )
        lines.append(
            f"detector    {what}, threshold {det[1].get('threshold', float('nan')):.4f} at FPR {record.target_fpr}"
        )
    lines.append("files       " + ", ".join(sorted(m["files"])))
    return "\n".join(lines)
