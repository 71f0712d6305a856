"""The table at the end of scripts/device_layouts.sh: one row per tp x pp layout from its JSON results.
    usage: python scripts/layouts_table.py RESULTS_DIR 1x1 2x1 ..."""

import json
import os
import sys


def load(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def main() -> None:
    folder, layouts = sys.argv[1], sys.argv[2:]
    print("| tp x pp | greedy agreement with tp 1 | TTFT median (ms) | TPOT median (ms) | offline out tok/s "
          "| stage 0 idle |")
    print("| --- | --- | --- | --- | --- | --- |")
    for layout in layouts:
        agree = load(folder, f"agreement_{layout}.json")
        lat = load(folder, f"latency_{layout}.json")
        off = load(folder, f"offline_{layout}.json")
        tok_s = off.get("results", {}).get("gridserve", {}).get("output_tok_s")
        idle = off.get("pp_stage0_idle_fraction")
        cells = [layout.replace("x", " x "),
                 "baseline" if layout == "1x1" else (f"{agree['agreement']:.1%}" if agree else "not run"),
                 f"{lat['ttft_ms_median']:.2f}" if lat else "failed",
                 f"{lat['tpot_ms_median']:.2f}" if lat else "failed",
                 f"{tok_s:,.0f}" if tok_s else "failed",
                 f"{idle:.1%}" if idle is not None else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
