"""The PyTorch oracle's largest errors over all its cases (tests/test_torch_oracle.py asserts
1e-12 for outputs, losses and final states, 1e-10 for gradients; this prints what is reached).

    python bench/oracle_errors.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_torch_oracle as oracle

if __name__ == "__main__":
    rows = [oracle.case_errors(*case, lengths) for case in oracle.CASES for lengths in (False, True)]
    worst = {k: max(r[k] for r in rows) for k in rows[0]}
    print(f"{len(rows)} cases (norm-wise, float64): "
          + ", ".join(f"largest {k} error {v:.2e}" for k, v in worst.items()))  # fmt: skip
