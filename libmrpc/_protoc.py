"""``mrpc-protoc FILE.proto --out DIR [-I DIR ...]``: write ``DIR/<stem>_mrpc.py``.

The written module is the one :func:`libmrpc.loader.load_proto` would load: it
embeds the schema texts and descriptor set, so importing it needs only libmrpc
and protobuf (not grpcio-tools).
"""

from __future__ import annotations

from pathlib import Path

import click

from libmrpc._codegen import generate_source, write_atomic
from libmrpc._schema import compile_texts, read_proto
from libmrpc.status import SchemaError


@click.command()
@click.argument("proto", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write <stem>_mrpc.py into (created if missing).",
)
@click.option(
    "-I",
    "--include",
    "include_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory to resolve imports against (repeatable).",
)
def main(proto: Path, out_dir: Path, include_dirs: tuple[Path, ...]) -> None:
    """Compile PROTO into an mrpc stub module."""
    try:
        bundle = compile_texts(read_proto(proto, include_dirs))
    except SchemaError as e:
        raise click.ClickException(str(e)) from None
    target = out_dir / f"{proto.stem}_mrpc.py"
    write_atomic(target, generate_source(bundle))
    click.echo(f"wrote {target} (schema {bundle.schema_hash})")


if __name__ == "__main__":
    main()
