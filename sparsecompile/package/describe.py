"""``sparsecompile inspect model.scpkg``: the manifest, readable."""

from __future__ import annotations

from sparsecompile.package.archive import SIGNATURE, Package


def _shape(spec: dict) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in spec["shape"])


def signature_line(package: Package) -> str:
    if package.signature_key_id:
        return f"{SIGNATURE}: signature verified, Ed25519 key {package.signature_key_id} (--verify-key)"
    if package.signature is None:
        return ("none: unsigned package (the SHA-256 hashes catch corruption, not someone who rewrites the "
                "manifest too)")
    from sparsecompile.package.signing import claimed_key_id

    claimed = claimed_key_id(package.signature)
    who = f"claims Ed25519 key {claimed}" if claimed else "unreadable"
    return f"{SIGNATURE} present ({who}), NOT checked: pass --verify-key KEY.pub to check it"


def describe_package(package: Package) -> str:
    m = package.manifest
    kib = 1024.0
    target = m["target"]
    source = m["model"]["source"]
    lines = [
        f"package   {package.path} ({package.size / kib:.1f} KiB, format {m['format']} v{m['version']}, "
        f"all {len(m['members'])} members verified)",
        f"model     {m['model']['name']} (source sha256 {str(source.get('sha256'))[:16]}..., built {m.get('created')})",
        f"target    {target['name']}: {target['description']} (built for {m['build_target']})",
        f"precision {m['precision']}, pattern {m['pattern']}, masks {m['masks']['method']}"
        f" (correct={m['masks']['options'].get('correct')}, permute={m['masks']['options'].get('permute')})",
    ]
    for kind in ("inputs", "outputs"):
        for spec in m[kind]:
            lines.append(f"{kind[:-1]:<9} {spec['name']}: {spec['dtype']} {_shape(spec)}")
    pre = m["preprocessing"]
    lines.append(f"preproc.  {pre['note']}"
                 + (f"; --preprocess {pre['preprocess']}" if pre.get("preprocess") else "")
                 + f" (calibration: {pre['calibration']['source']}, {pre['calibration']['samples']} samples)")
    summary = m["sparsity"]["summary"]
    lines.append(f"sparsity  {summary['sparse_layers']} of {summary['layers']} layers sparse, "
                 f"{summary['sparse_layer_weights']} of {summary['gemm_weights']} GEMM weights in sparse layers")
    for layer in m["sparsity"]["layers"]:
        status = layer["status"] if layer["status"] == "sparse" else f"dense ({layer.get('reason') or '-'})"
        zeros = f"{layer['zero_fraction']:.2f} zeros" if layer.get("zero_fraction") is not None else ""
        lines.append(f"  {layer['name']:<28} {'x'.join(map(str, layer['shape'])):<14} {status} {zeros}".rstrip())
    for entry in m["accuracy"]["sparse_vs_dense"]:
        agree = entry.get("top1_agreement")
        lines.append(f"accuracy  output {entry['output']}: top-1 agreement with dense "
                     f"{'n/a' if agree is None else f'{agree:.4f}'}, relative error {entry['relative_error']:.3g} "
                     "(build's calibration set)")
    quantization = m.get("quantization")
    if quantization:
        kept = quantization.get("kept_float") or {}
        lines.append(f"int8      {quantization['onnx']} ({quantization['format']}, {quantization['calibration']} ranges): "
                     f"{len(quantization.get('quantized') or [])} layer(s) int8, {len(kept)} kept float"
                     + (f" ({', '.join(sorted(kept)[:5])})" if kept else ""))
    check = m["accuracy"]["bundle_vs_build_onnx"]
    lines.append(f"bundle    vs build {check.get('build_onnx', 'ONNX')} max abs diff {check['max_abs_diff']:.3g}")
    sizes = m["sizes"]
    sparse = sizes["sparse_layers"]
    if sparse and m["precision"] == "int8":
        lines.append(f"sizes     sparse layers {sparse['compressed_bytes'] / kib:.1f} KiB (int8 values, indices, scales) = "
                     f"{sparse['ratio_vs_dense']:.4f}x of dense int8; bundle {package.size / sizes['dense_onnx_bytes']:.2f}x "
                     f"of the dense fp32 ONNX ({sizes['dense_onnx_bytes'] / kib:.1f} KiB)")
    elif sparse:
        lines.append(f"sizes     sparse layers {sparse['compressed_bytes'] / kib:.1f} KiB = "
                     f"{sparse['ratio_vs_dense_fp16']:.4f}x of dense fp16; bundle {package.size / sizes['dense_onnx_bytes']:.2f}x "
                     f"of the dense ONNX ({sizes['dense_onnx_bytes'] / kib:.1f} KiB)")
    engine = m.get("engine")
    lines.append(f"engine    {', '.join(engine['members'])}: {engine['note']}" if engine else "engine    none (CPU target)")
    libs = m["libraries"]
    lines.append("libraries " + ", ".join(f"{k} {v}" for k, v in sorted(libs.items())))
    for name, entry in m["members"].items():
        lines.append(f"member    {name:<24} {entry['bytes']:>10} B  sha256 {entry['sha256'][:16]}...")
    lines.append(f"signature {signature_line(package)}")
    lines.extend(f"note      {n}" for n in m.get("notes", []))
    return "\n".join(lines)
