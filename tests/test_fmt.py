"""sparta.fmt: the one formatter per kind of number, checked against strings written by hand."""
import math

from sparta import fmt


def test_eps_whole_255ths_and_digits():
    assert ([fmt.eps(e) for e in (0, 8 / 255, 0.1, 1.0, 0.03, 2 / 255 + 1e-4)]
            == ["0", "8/255", "0.1", "1", "0.03", "0.007943"])
    assert fmt.eps(0.123456789) == "0.1235" and fmt.eps(0.123456789, sig=6) == "0.123457"
    # the report's protocol lines: fractions at any size (eps 1 is 255/255), six digits
    assert fmt.eps(1.0, sig=6, fraction_below=math.inf) == "255/255"
    assert fmt.eps(0.0313725, sig=6, fraction_below=math.inf) == "0.0313725"
    assert [fmt.eps(v) for v in (None, "8/255", True, math.inf)] == ["None", "8/255", "True", "inf"]


def test_percentages():
    assert fmt.percent(44.5) == "44.50%" and fmt.percent(79.25, ".1f") == "79.2%" and fmt.percent(None) == "-"
    assert fmt.fraction(0.2) == "20%" and fmt.fraction(0.4813, ".1f") == "48.1%" and fmt.fraction(None) == "-"
    assert fmt.share(1, 3) == "33%" and fmt.share(16, 31.5) == "51%"
    assert fmt.share(None, 3) == "-" and fmt.share(1, 0) == "-" and fmt.share(1, None) == "-"


def test_flops():
    assert fmt.si_prefix(999) == (1.0, "") and fmt.si_prefix(1000) == (1e3, "k") and fmt.si_prefix(-2e18) == (1e18, "E")
    assert fmt.flops(1.2345e15) == "1.23e+15" and fmt.flops(None) == "-"  # bare number
    assert fmt.flops(4.2e15, unit="FLOP") == "4.2 PFLOP" and fmt.flops(1.66e5, unit="FLOP") == "166 kFLOP"
    assert fmt.flops(1.1111e9, ".3f", unit="FLOPs", unscaled=".0f") == "1.111 GFLOPs"
    assert fmt.flops(500, ".3f", unit="FLOPs", unscaled=".0f") == "500 FLOPs"
    assert fmt.flops_unit(4.2e15) == (1e15, ".3g", " PFLOP")


def test_time_unit():
    assert fmt.time_unit(119.9) == (1.0, ".1f", " s")
    assert fmt.time_unit(120) == (60.0, ".1f", " min") and fmt.time_unit(7199) == (60.0, ".1f", " min")
    assert fmt.time_unit(7200) == (3600.0, ".2f", " h")
