"""``cpnn encoders``: the encoder registry, what each needs and the patch geometry it sees."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List


def encoder_rows() -> List[Dict[str, Any]]:
    """One dict per registered encoder (see :func:`cpnn.encoders.encoder_info`)."""
    from .encoders import encoder_info, list_encoders

    return [encoder_info(name) for name in list_encoders()]


def format_encoder_table(rows: List[Dict[str, Any]]) -> str:
    """The table ``cpnn encoders`` prints."""
    def availability(r: Dict[str, Any]) -> str:
        if r["weights"] == "offline":
            return "offline (ships with cpnn)"
        if r["weights"] == "hub":
            state = f"install {', '.join(r['missing'])}" if r["missing"] else "packages installed"
            return f"needs the Hugging Face hub ({state})"
        return "unknown (registered by a plugin)"

    header = ("name", "weights", "features", "input", "source")
    table = [header] + [(r["name"], availability(r), f"{r['dim']}-d" if r["dim"] else "?",
                         f"{r['input_px']} px" if r["input_px"] else "?", r["source"] or "") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        "Patch geometry: a spot is a 112 µm square (--patch-um) cut into 2 x 2 sub-patches of 56 µm "
        "(--subpatch-grid),",
        "each read at 224 px (0.25 µm/px) and resized to the encoder's input; whole slides are tiled at "
        "the model's sub-patch size.",
        "Hub encoders: pip install 'cpnn[hub]' and access to the Hugging Face hub (several are gated: "
        "accept their terms and log in);",
        "a local checkpoint works offline: create_encoder(NAME, weights=PATH).",
    ]
    return "\n".join(lines)


def _cmd_encoders(args: argparse.Namespace) -> int:
    print(format_encoder_table(encoder_rows()))
    return 0


def register(sub) -> None:
    """Add ``encoders`` to the ``cpnn`` sub-commands."""
    p = sub.add_parser("encoders", help="list the image encoders: offline or hub, feature size, input size")
    p.set_defaults(func=_cmd_encoders)
