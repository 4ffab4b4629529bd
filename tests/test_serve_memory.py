"""bench.serve_memory: the resident-memory stages of a fresh process serving a bundle."""

import json

from bench import serve_memory


def test_stages_of_a_fresh_process_in_order(tiny_bundle, tmp_path):
    out = tmp_path / "memory.json"
    serve_memory.main(["--bundles", str(tiny_bundle), "--json", str(out)])
    stages = json.loads(out.read_text())["bundles"][str(tiny_bundle)]
    order = ["interpreter", "import_torch", "load_bundle", "first_screen_32", "import_service"]
    assert list(stages)[: len(order)] == order
    assert stages["interpreter"] < 100 < stages["import_torch"]  # torch's libraries dwarf the bare interpreter
    assert stages["import_torch"] <= stages["load_bundle"] <= stages["first_screen_32"] + 1  # RSS may dip by pages
    assert stages["torch"]
