#!/usr/bin/env python3
"""Challenge container entry point: register every pair in /input, write the fields to /output.

Runs exactly what `brainshift run --input /input --output /output` runs. Overridable by environment:
BRAINSHIFT_INPUT, BRAINSHIFT_OUTPUT, BRAINSHIFT_MODALITY (t1 | t2 | both; the ReMIND2Reg T1 and T2
submissions set it at build time), BRAINSHIFT_METHOD, and BRAINSHIFT_QC: ``1`` also writes the QC
report files to /output/qc/ (per-stage figure, report JSON; off by default in the container, so
/output holds only the fields the challenge expects; the CLI writes them by default).
"""
import os
import sys

from brainshift.cli import main

if __name__ == "__main__":
    sys.exit(main([
        "run",
        "--input", os.environ.get("BRAINSHIFT_INPUT", "/input"),
        "--output", os.environ.get("BRAINSHIFT_OUTPUT", "/output"),
        "--modality", os.environ.get("BRAINSHIFT_MODALITY", "both"),
        "--method", os.environ.get("BRAINSHIFT_METHOD", "brainshift"),
        "--qc" if os.environ.get("BRAINSHIFT_QC", "0") == "1" else "--no-qc",
    ] + sys.argv[1:]))
