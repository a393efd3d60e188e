"""`workbench schema run|recipe [--out FILE]`: the JSON Schema of run configs or adapter recipes.

An editor with a YAML language server checks a file against it as it is typed: put
`# yaml-language-server: $schema=<path or URL of the schema>` on the file's first line (README.md).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of run configs or adapter recipes (for editors)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["run", "recipe"], help="run: configs/*.yaml; recipe: adapters/*.yaml")
    p.add_argument("--out", help="write it to this file instead of printing it")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from workbench.json_schema import recipe_schema, run_schema

    text = json.dumps(run_schema() if args.kind == "run" else recipe_schema(), indent=2) + "\n"
    if args.out:
        from workbench.atomic import write_text

        write_text(args.out, text)
    else:
        print(text, end="")
    return 0

