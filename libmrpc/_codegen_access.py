"""Code generation of the per-field accessors of generated message classes.

How this works: each field becomes a ``property`` whose getter and setter are
module-level functions with the slot offset, presence word/mask, oneof case slot
and value checks baked in as constants, e.g. for ``int32 x = 1`` at offset 8::

    def _g3_0(self):
        return _U_i(self._buf, self._off + 8)[0]

    def _s3_0(self, v):
        if self._w: self._wprep()
        if v.__class__ is not int: v = _rt.as_int(v, 'pkg.M.x')
        if not -2147483648 <= v <= 2147483647: _rt.out_of_range(v, 'pkg.M.x')
        _P_i(self._buf, self._off + 8, v)

Only validated identifiers and ``repr()`` of validated names reach the source.
Names used by the generated code: ``_C<k>`` classes, ``_F<k>_<i>`` field specs,
``_M<k>_<j>`` oneof member tables, ``_U_<c>``/``_P_<c>`` struct functions.
"""

from __future__ import annotations

from libmrpc.wire.layout import FieldLayout, Kind, MessageLayout

# struct format char -> identifier suffix of the _U_/_P_ helpers
FMT_NAMES = {"d": "d", "f": "f", "i": "i", "I": "I", "q": "q", "Q": "Q", "?": "b"}
_RANGES = {
    "i": (-(1 << 31), (1 << 31) - 1),
    "I": (0, (1 << 32) - 1),
    "q": (-(1 << 63), (1 << 63) - 1),
    "Q": (0, (1 << 64) - 1),
}
_DEFAULTS = {"d": "0.0", "f": "0.0", "i": "0", "I": "0", "q": "0", "Q": "0", "?": "False"}


def struct_helpers() -> str:
    lines = ["_U_R = _struct.Struct('<II').unpack_from", "_P_R = _struct.Struct('<II').pack_into"]
    for fmt, nm in FMT_NAMES.items():
        lines.append(f"_S_{nm} = _struct.Struct('<{fmt}')")
        lines.append(f"_U_{nm} = _S_{nm}.unpack_from")
        lines.append(f"_P_{nm} = _S_{nm}.pack_into")
    return "\n".join(lines) + "\n"


def _check(f: FieldLayout, where: str) -> list[str]:
    fmt = f.fmt
    if fmt in _RANGES:
        lo, hi = _RANGES[fmt]
        return [
            f"if v.__class__ is not int: v = _rt.as_int(v, {where})",
            f"if not {lo} <= v <= {hi}: _rt.out_of_range(v, {where})",
        ]
    if fmt == "?":
        return [f"if v.__class__ is not bool: v = _rt.as_bool(v, {where})"]
    return [f"if v.__class__ is not float: v = _rt.as_float(v, {where})"]


def _guard(f: FieldLayout, ml: MessageLayout) -> str | None:
    """Condition (on locals b, o) under which the field's slot is meaningful."""
    if f.oneof_name is not None:
        case = next(x for x in ml.oneofs if x.name == f.oneof_name)
        return f"_U_I(b, o + {case.offset})[0] == {f.number}"
    if f.presence_bit is not None:
        word, bit = 8 * (f.presence_bit // 64), f.presence_bit % 64
        return f"_U_Q(b, o + {word})[0] & {1 << bit}"
    return None


def _mark(f: FieldLayout, ml: MessageLayout, k: int) -> list[str]:
    """Setter lines that make the field present (oneof case, presence bit)."""
    if f.oneof_name is not None:
        j = [x.name for x in ml.oneofs].index(f.oneof_name)
        case = ml.oneofs[j]
        return [f"_rt.set_case(self, {case.offset}, {f.number}, _M{k}_{j})"]
    if f.presence_bit is not None:
        word, bit = 8 * (f.presence_bit // 64), f.presence_bit % 64
        return [f"_P_Q(b, o + {word}, _U_Q(b, o + {word})[0] | {1 << bit})"]
    return []


def _func(name: str, args: str, body: list[str]) -> list[str]:
    return [f"def {name}({args}):"] + ["    " + line for line in body] + [""]


def accessors(k: int, ml: MessageLayout, ids: dict[str, int]) -> tuple[str, list[str]]:
    """(module-level getter/setter source, class-body property lines) of one type."""
    src: list[str] = []
    props: list[str] = []
    for i, f in enumerate(ml.fields):
        where = repr(f"{ml.full_name}.{f.name}")
        g, s = f"_g{k}_{i}", f"_s{k}_{i}"
        spec = f"_F{k}_{i}"
        guard = _guard(f, ml)
        mark = _mark(f, ml, k)
        x = f.offset
        head = ["b = self._buf", "o = self._off"]
        wprep = ["if self._w: self._wprep()"]
        if f.kind == Kind.SCALAR:
            u, p = f"_U_{FMT_NAMES[f.fmt]}", f"_P_{FMT_NAMES[f.fmt]}"
            if guard:
                get = head + [
                    f"if {guard}: return {u}(b, o + {x})[0]",
                    f"return {_DEFAULTS[f.fmt]}",
                ]
            else:
                get = [f"return {u}(self._buf, self._off + {x})[0]"]
            put = [f"{p}(b, o + {x}, v)"]
            if f.fmt == "f":
                put = [
                    "try:",
                    f"    {p}(b, o + {x}, v)",
                    "except OverflowError:",
                    f"    {p}(b, o + {x}, _rt.f32_overflow(v))",
                ]
            sets = wprep + _check(f, where) + head + mark + put
        elif f.kind in (Kind.STRING, Kind.BYTES):
            is_str = f.kind == Kind.STRING
            empty = "''" if is_str else "_EMPTY"
            value = "str(b[r:r + n], 'utf-8')" if is_str else "b[r:r + n]"
            get = (
                head
                + ([f"if not ({guard}): return {empty}"] if guard else [])
                + [
                    f"r, n = _U_R(b, o + {x})",
                    "if n:",
                    "    r += self._base",
                    f"    return {value}",
                    f"return {empty}",
                ]
            )
            conv = (
                [f"if v.__class__ is not str: v = _rt.as_str(v, {where})", "v = v.encode()"]
                if is_str
                else [f"if v.__class__ is not bytes: v = _rt.as_bytes(v, {where})"]
            )
            sets = wprep + conv + head + mark + [f"_rt.put_blob(self, {x}, v)"]
        elif f.kind == Kind.MESSAGE:
            sub = f"_C{ids[f.type_name]}"  # type: ignore[index]
            cond = f"n and {guard}" if guard else "n"
            get = head + [
                f"r, n = _U_R(b, o + {x})",
                f"if {cond}:",
                (
                    f"    return {sub}._view(b, self._base, self._base + r, "
                    "self._owner, self._w & 1)"
                ),
                f"return {sub}._lazy(self, {spec})",
            ]
            sets = [f"_rv.set_message(self, {spec}, v)"]
        else:
            view = {
                Kind.REPEATED_SCALAR: "_rv.RepeatedScalar",
                Kind.REPEATED_STRING: "_rv.RepeatedBlob",
                Kind.REPEATED_BYTES: "_rv.RepeatedBlob",
                Kind.REPEATED_MESSAGE: "_rv.RepeatedMessage",
                Kind.MAP: "_rv.MapView",
            }[f.kind]
            get = [f"return {view}(self, {spec})"]
            sets = [f"{view}(self, {spec})._assign(v)"]
        src += _func(g, "self", get) + _func(s, "self, v", sets)
        props.append(f"    {f.attr_name} = property({g}, {s})")
    return "\n".join(src) + "\n", props


def spec_bindings(k: int, ml: MessageLayout) -> list[str]:
    """Module-level names for the runtime specs used by the accessors of type k."""
    lines = []
    for i, f in enumerate(ml.fields):
        if f.kind != Kind.SCALAR and f.kind not in (Kind.STRING, Kind.BYTES):
            lines.append(f"_F{k}_{i} = _C{k}._SPECS[{f.name!r}]")
    for j, o in enumerate(ml.oneofs):
        lines.append(f"_M{k}_{j} = _C{k}._MEMBERS[{o.name!r}]")
    return lines
