"""Human units for printing. Counts use SI prefixes (7.24 B); bytes use binary GiB = 2^30
(docs/architecture.md "Counting conventions"); bandwidths decimal GB/s and TB/s, as datasheets and
nccl-tests quote them (an H100's 3.35 TB/s of HBM, `plan`'s 450 GB/s of NVLink)."""

from __future__ import annotations

import math
import re

_COUNT = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
# The SI suffixes an amount may be written with (--tokens 15T), as powers of ten: the command line
# reads them (commands/size.py `parse_amount`), and a spec's refusal of one says how to write it
SI_EXPONENTS = {"k": 3, "m": 6, "b": 9, "g": 9, "t": 12, "p": 15}
_BYTES = ((1 << 60, "EiB"), (1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))
_FLOPS = ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def _three_digits(value: float) -> str:
    """Three significant digits, the precision a sizing table needs (7.24, 13.5, 671)."""
    if abs(value) >= 100:
        return f"{value:,.0f}"  # past the largest unit the integer part grows: group its digits
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _rounded(value: float) -> float:
    """`value` at the three significant digits it prints with: 9.996 -> 10.0, 999.7 -> 1,000."""
    return round(value) if abs(value) >= 100 else float(f"{value:.3g}")


def _in_unit(n: float, scales: tuple[tuple[float, str], ...], suffix: str = "") -> str | None:
    """`n` in the largest unit of `scales` in which it still reads 1 or more once rounded, so that
    1,023.9 MiB prints as 1.00 GiB and 999.7 K as 1.00 M; None below the smallest unit."""
    for scale, prefix in scales:
        value = _rounded(n / scale)
        if abs(value) >= 1:
            return f"{_three_digits(value)} {prefix}{suffix}"
    return None


# Context lengths are binary: an "8K context" is 8,192 tokens, "1M" is 1,048,576; 8Ki and 1Mi,
# the IEC spelling --global-batch-tokens takes for its binary units, mean the same.
_LENGTH = re.compile(r"^\s*([0-9]+(?:_[0-9]+)*)\s*((?:[km]i?)?)\s*$", re.IGNORECASE)
LENGTH_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}


class NonPositiveLength(ValueError):
    """A length written as a number, but zero or negative: named alike by every --seq."""


def parse_length(text: str) -> int:
    """A token count as every --seq takes it: '4096', '4_096', '4k', '4K' or '4Ki' (k = 1024, m = 1024²).
    NonPositiveLength for 0 or a negative one, ValueError otherwise (a fraction, as a spec's integer
    fields refuse one)."""
    match = _LENGTH.match(text)
    if match is None and _LENGTH.match(text.strip().removeprefix("-")):
        raise NonPositiveLength(f"a length must be positive, got {text!r}")
    if match is None:
        raise ValueError(f"expected a length such as 4096 or 4k (k = 1024), got {text!r}")
    length = int(match.group(1)) * LENGTH_SUFFIX[match.group(2)[:1].lower()]
    if length == 0:
        raise NonPositiveLength(f"a length must be positive, got {text.strip()!r}")
    return length


def count(n: float) -> str:
    """7,241,732,096 -> '7.24 B' (parameters, tokens)."""
    scaled = _in_unit(n, _COUNT)
    if scaled is not None:
        return scaled
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:.3g}"


def amount(x: float) -> str:
    """A plain quantity at three significant digits, digits grouped from 100 up (GPU-hours: 0.0495,
    1.19, 516, 24,310), so a small figure does not print as 0.0."""
    value = _rounded(x)
    return _three_digits(value) if value == 0 or abs(value) >= 1 else f"{value:.3g}"


def nbytes(n: float) -> str:
    """Bytes in binary units: 14,495,514,624 -> '13.5 GiB'."""
    return _in_unit(n, _BYTES) or f"{n:,.0f} B"


def bandwidth(bytes_per_s: float) -> str:
    """Bytes per second in decimal units: 3.35e12 -> '3.35 TB/s'."""
    return _in_unit(bytes_per_s, _FLOPS, "B/s") or f"{bytes_per_s:.3g} B/s"


def overshoot(needed: float, limit: float) -> str:
    """', over it by 3.07 MiB' where `needed` passes `limit` but both print as one figure ('72.0 GiB
    > 72.0 GiB' alone reads as a contradiction); '' otherwise."""
    close = needed > limit and nbytes(needed) == nbytes(limit)
    return f", over it by {nbytes(needed - limit)}" if close else ""


def flops(n: float, unit: str = "FLOP") -> str:
    """1.23e15 -> '1.23 PFLOP' (pass unit='FLOP/s' for rates)."""
    return _in_unit(n, _FLOPS, unit) or f"{n:.3g} {unit}"


def sci(x: float) -> str:
    """Scientific notation for budgets: 5.76e+23; a round 1e+24 stays short only where it is exact
    (a given --compute), so a computed 9.996e+23 reads 1.00e+24, not as if someone had rounded it."""
    short = f"{x:.3g}"
    return short if float(short) == x else f"{x:.2e}"


def sci_column(x: float) -> str:
    """Scientific notation with three significant digits always, so a column reads evenly
    (9.20e+20 beside 7.74e+21, where `sci` gives 9.2e+20)."""
    return f"{x:.2e}"


def ratio(x: float) -> str:
    """Two decimals (5.82×, 0.54×); below 0.1, two significant digits (0.0031×, not 0.00×); a ratio
    that two decimals show as 1.00× but is not 1 gets the decimals that tell it apart (1.004×, up
    to six: a loss 0.008 nat apart, or 4.01 GiB against 4.00, read as equal)."""
    if x == 0 or not math.isfinite(x) or abs(x) >= 0.1:
        shown = f"{x:.2f}"
        if shown == "1.00" and x != 1:
            shown = next((f"{x:.{d}f}" for d in range(3, 7) if f"{x:.{d}f}" != f"{1:.{d}f}"), shown)
        return f"{shown}×"
    magnitude = math.floor(math.log10(abs(x)))
    if abs(round(x, 1 - magnitude)) >= 10.0 ** (magnitude + 1):
        magnitude += 1  # 0.0999 rounds up to the next decade: 0.10×, not 0.100×
    return f"{x:.{1 - magnitude}f}×"


_DAY_FRACTIONS = ((1.0, "d"), (1 / 24, "h"), (1 / 1440, "min"))


# Past this no run is planned in days: 1,583,635,270.8 d reads better as 4.34 M years.
_YEARS_FROM_DAYS = 10_000
_DAYS_PER_YEAR = 365.25


def duration(days: float) -> str:
    """A training time given in days: '33.8 d'; under a day in hours, minutes or seconds ('5.1 h',
    '12.0 min', '40.0 s', '0.0012 s'), so a short run does not print as 0.0 days; past 10,000 days
    in years ('4.34 M years')."""
    if not math.isfinite(days):
        return f"{days} d"
    if days >= _YEARS_FROM_DAYS:
        return f"{count(days / _DAYS_PER_YEAR)} years"
    for scale, unit in _DAY_FRACTIONS:
        if days >= scale:
            return f"{days / scale:,.1f} {unit}"
    seconds = days * 86400
    return f"{seconds:.1f} s" if seconds >= 0.05 or seconds == 0 else f"{seconds:.2g} s"


def percent(x: float) -> str:
    """One decimal; a share too small for it keeps two significant digits (a tiny model's MFU on a
    CPU read "0.0%", as if nothing ran)."""
    if 0 < abs(x) < 0.0005:
        return f"{100 * x:.2g}%"
    return f"{100 * x:.1f}%"


def things(n: int, noun: str) -> str:
    """1 micro-batch, 16 micro-batches: a count with its noun in the right number."""
    return f"{n:,} {noun if n == 1 else noun + ('es' if noun.endswith(('h', 's', 'x')) else 's')}"
