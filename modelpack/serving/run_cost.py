"""What a batch of ``rows`` costs the model: ``fixed + rows * per_row`` seconds, fitted to the
recent runs (least squares with exponential forgetting), so the queue's arithmetic holds for a
model whose cost grows with its rows as for one whose batch costs about the same at any size."""

from __future__ import annotations

import threading

FORGET = 0.1  # the weight of each new run: about the last 10 runs count


class RunCost:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0
        # Weighted means of rows, seconds, rows², rows·seconds.
        self._x = self._y = self._xx = self._xy = 0.0
        self.fixed_s = 0.0
        self.per_row_s = 0.0
        self.fitted = False  # a slope was told from the runs' sizes (else all is per row)

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or not seconds >= 0:
            return
        x, y = float(rows), float(seconds)
        with self._lock:
            w = 1.0 if self._n == 0 else FORGET
            self._n += 1
            self._x += w * (x - self._x)
            self._y += w * (y - self._y)
            self._xx += w * (x * x - self._xx)
            self._xy += w * (x * y - self._xy)
            var = self._xx - self._x * self._x
            if var > 0.25:  # row counts that differ enough to tell a slope from noise
                slope = max(0.0, (self._xy - self._x * self._y) / var)
                self.per_row_s = slope
                self.fixed_s = max(0.0, self._y - slope * self._x)
                self.fitted = True
            else:  # one size seen: charge it all per row (the cautious reading for more rows)
                self.per_row_s, self.fixed_s = self._y / self._x, 0.0
                self.fitted = False

    def known(self) -> bool:
        return self._n > 0

    def estimate(self, rows: int) -> float:
        """Seconds a run of ``rows`` rows takes (0 until a run was seen)."""
        return self.fixed_s + rows * self.per_row_s if self._n else 0.0

    def rows_within(self, seconds: float) -> int:
        """The most rows a run can take and end within ``seconds`` (0: not even one)."""
        if not self._n or self.per_row_s <= 0:
            return 1 << 30
        return max(0, int((seconds - self.fixed_s) / self.per_row_s))
