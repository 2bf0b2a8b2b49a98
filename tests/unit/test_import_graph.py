"""The library's imports run one way: no module imports, directly or through others, a module that imports it.

`make lint` checks the layers between subpackages (lint-imports, contract in pyproject.toml); this checks that no
cycle hides inside one layer either."""

import grimp


def test_no_import_cycle_in_the_library():
    graph = grimp.build_graph("wan_triton")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} -> {imported} -> ... -> {module}")
    assert not cycles, "\n".join(cycles)
