"""Code generation of the daemon-side MARSHAL and VALIDATE functions.

How this works: for every message type with references, two straight-line
functions are emitted: ``_mx<k>`` (send side: rewrite the references of a record
already copied into the image head, emitting their targets) and ``_vx<k>``
(receive side: check the references of a record inside an image). Offsets, record
sizes, element strides and the recursion targets are constants in the code; the
runtime state classes live in :mod:`libmrpc.wire.marshal`. Each message type also
gets a root function ``_marshal<k>`` / ``_validate<k>`` for the MARSHAL/VALIDATE
tables. See ``docs/LAYOUT.md`` for the image format.
"""

from __future__ import annotations

from libmrpc.wire.layout import MAX_DEPTH, Kind, MessageLayout


def has_refs(ml: MessageLayout) -> bool:
    return any(f.kind in Kind.REFS for f in ml.fields)


def _oneof_cases(ml: MessageLayout, var: str) -> tuple[list[str], dict[int, str]]:
    """Lines reading the case slots that guard ref members; field number -> condition."""
    lines, cond = [], {}
    for i, o in enumerate(ml.oneofs):
        members = [f for f in ml.fields if f.number in o.members and f.kind in Kind.REFS]
        if not members:
            continue
        lines.append(f"    c{i} = _U_I({var}, d + {o.offset})[0]")
        for f in members:
            cond[f.number] = f"c{i} == {f.number}"
    return lines, cond


def marshal_code(
    k: int, ml: MessageLayout, ids: dict[str, int], layouts: dict[str, MessageLayout]
) -> str:
    """Source of ``_mx<k>`` (if the type has refs) and ``_marshal<k>``."""
    name = repr(ml.full_name)
    out = []
    if has_refs(ml):
        out.append(f"def _mx{k}(S, heap, hsize, d, depth):")
        out.append("    head = S.head")
        case_lines, cond = _oneof_cases(ml, "head")
        out += case_lines
        for f in ml.fields:
            if f.kind not in Kind.REFS:
                continue
            w = repr(f"{ml.full_name}.{f.name}")
            x = f.offset
            body = [f"r, n = _U_R(head, d + {x})", "if n:"]
            if f.kind in (Kind.STRING, Kind.BYTES):
                body += [
                    f"    if r + n > hsize: S.bad({w}, r, n)",
                    f"    S.blob(heap, r, n, d + {x})",
                ]
            elif f.kind == Kind.MESSAGE:
                sub = layouts[f.type_name]  # type: ignore[index]
                sz = sub.size
                body += [
                    f"    if n != {sz} or r + {sz} > hsize: S.bad({w}, r, n, {sz})",
                    f"    p = S.rec(heap, r, {sz})",
                    f"    _P_R(head, d + {x}, p, {sz})",
                ]
                if has_refs(sub):
                    body += [
                        f"    if depth >= {MAX_DEPTH}: S.deep({w})",
                        f"    _mx{ids[sub.full_name]}(S, heap, hsize, p, depth + 1)",
                    ]
            elif f.kind == Kind.REPEATED_SCALAR:
                es = f.elem_size
                body += [
                    f"    if r + n * {es} > hsize: S.bad({w}, r, n)",
                    f"    _P_R(head, d + {x}, S.arr(heap, r, n * {es}, 1), n)",
                ]
            elif f.kind in (Kind.REPEATED_STRING, Kind.REPEATED_BYTES):
                body += [
                    f"    if r + n * 8 > hsize: S.bad({w}, r, n)",
                    "    p = S.arr(heap, r, n * 8, n)",
                    f"    _P_R(head, d + {x}, p, n)",
                    f"    S.blobs(heap, p, n, {w})",
                ]
            else:  # repeated message / map
                sub = layouts[f.type_name]  # type: ignore[index]
                sz = sub.size
                body += [
                    f"    if r + n * {sz} > hsize: S.bad({w}, r, n)",
                    f"    p = S.arr(heap, r, n * {sz}, n)",
                    f"    _P_R(head, d + {x}, p, n)",
                ]
                if has_refs(sub):
                    body += [
                        f"    if depth >= {MAX_DEPTH}: S.deep({w})",
                        f"    for q in range(p, p + n * {sz}, {sz}):",
                        f"        _mx{ids[sub.full_name]}(S, heap, hsize, q, depth + 1)",
                    ]
            body += ["else:", f"    _P_R(head, d + {x}, 0, 0)"]
            c = cond.get(f.number)
            if c is not None:
                body = [f"if {c}:"] + ["    " + b for b in body]
                body += ["else:", f"    _P_R(head, d + {x}, 0, 0)"]
            out += ["    " + b for b in body]
        out.append("")
    out.append(f"def _marshal{k}(heap, off, zero_copy_min, max_size):")
    out.append("    try:")
    out.append(f"        S = _mr.Marshal(heap, off, {ml.size}, zero_copy_min, max_size, {name})")
    if has_refs(ml):
        out.append(f"        _mx{k}(S, heap, S.hsize, 0, 1)")
    out.append("        return S.finish()")
    out.append("    except _WireError:")
    out.append("        raise")
    out.append("    except Exception as e:")
    out.append(f"        raise _mr.unexpected({name}, e) from None")
    return "\n".join(out) + "\n"


def validate_code(
    k: int, ml: MessageLayout, ids: dict[str, int], layouts: dict[str, MessageLayout]
) -> str:
    """Source of ``_vx<k>`` (if the type has refs) and ``_validate<k>``."""
    name = repr(ml.full_name)
    out = []
    if has_refs(ml):
        out.append(f"def _vx{k}(S, img, L, d, depth):")
        case_lines, cond = _oneof_cases(ml, "img")
        out += case_lines
        for f in ml.fields:
            if f.kind not in Kind.REFS:
                continue
            w = repr(f"{ml.full_name}.{f.name}")
            x = f.offset
            body = [f"r, n = _U_R(img, d + {x})"]
            if f.kind in (Kind.STRING, Kind.BYTES):
                body += [f"if n and r + n > L: S.bad({w}, r, n)"]
            elif f.kind == Kind.MESSAGE:
                sub = layouts[f.type_name]  # type: ignore[index]
                sz = sub.size
                body += [
                    "if n:",
                    f"    if n != {sz} or r + {sz} > L: S.bad({w}, r, n, {sz})",
                    "    S.visit(1)",
                ]
                if has_refs(sub):
                    body += [
                        f"    if depth >= {MAX_DEPTH}: S.deep({w})",
                        f"    _vx{ids[sub.full_name]}(S, img, L, r, depth + 1)",
                    ]
            elif f.kind == Kind.REPEATED_SCALAR:
                body += [f"if n and r + n * {f.elem_size} > L: S.bad({w}, r, n)"]
            elif f.kind in (Kind.REPEATED_STRING, Kind.REPEATED_BYTES):
                body += [
                    "if n:",
                    f"    if r + n * 8 > L: S.bad({w}, r, n)",
                    "    S.visit(n)",
                    f"    S.refs(img, r, n, {w})",
                ]
            else:
                sub = layouts[f.type_name]  # type: ignore[index]
                sz = sub.size
                body += ["if n:", f"    if r + n * {sz} > L: S.bad({w}, r, n)", "    S.visit(n)"]
                if has_refs(sub):
                    body += [
                        f"    if depth >= {MAX_DEPTH}: S.deep({w})",
                        f"    for q in range(r, r + n * {sz}, {sz}):",
                        f"        _vx{ids[sub.full_name]}(S, img, L, q, depth + 1)",
                    ]
            c = cond.get(f.number)
            if c is not None:
                body = [f"if {c}:"] + ["    " + b for b in body]
            out += ["    " + b for b in body]
        out.append("")
    out.append(f"def _validate{k}(image):")
    out.append("    try:")
    out.append(f"        S = _mr.Validate(image, {ml.size}, {name})")
    if has_refs(ml):
        out.append(f"        _vx{k}(S, image, S.size, 0, 1)")
    out.append("    except _WireError:")
    out.append("        raise")
    out.append("    except Exception as e:")
    out.append(f"        raise _mr.unexpected({name}, e) from None")
    return "\n".join(out) + "\n"
