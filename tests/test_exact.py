"""The exact solver's accuracy and statistics, checked against NIST's certified values and statsmodels.

The NIST StRD linear regression datasets (tests/data/nist/, public domain, NIST Information
Technology Laboratory, copied unedited from the data/NIST folder of the mathnet-numerics
repository) are fitted through the Trainer from CSV files written with 17 significant digits.
CERTIFIED below holds the values printed in each file's "Certified Regression Statistics"
section: (coefficient, standard deviation) for B0..Bk, the residual standard deviation and R².
"""

import json
import math
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import statsmodels.api as sm
import torch

from cropyield import (
    CropYieldDataModule,
    CropYieldError,
    CropYieldRegressor,
    LeastSquaresRegressor,
    load_regressor,
    predict,
)
from cropyield.errors import CropYieldWarning
from cropyield.inference import LinearPredictor

from .conftest import assert_one_line_error, run, write_csv

NIST = Path(__file__).parent / "data" / "nist"

# fmt: off
CERTIFIED = {  # dataset: ([(B_i, standard deviation of B_i), ...], residual standard deviation, R²)
    "Norris": ([(-0.262323073774029, 0.232818234301152), (1.00211681802045, 0.429796848199937E-03)], 0.884796396144373, 0.999993745883712),  # noqa: E501
    "Pontius": ([(0.673565789473684E-03, 0.107938612033077E-03), (0.732059160401003E-06, 0.157817399981659E-09), (-0.316081871345029E-14, 0.486652849992036E-16)], 0.205177424076185E-03, 0.999999900178537),  # noqa: E501
    "NoInt1": ([(2.07438016528926, 0.165289256198347E-01)], 3.56753034006338, 0.999365492298663),
    "NoInt2": ([(0.727272727272727, 0.420827318078432E-01)], 0.369274472937998, 0.993348115299335),
    "Filip": ([(-1467.48961422980, 298.084530995537), (-2772.17959193342, 559.779865474950), (-2316.37108160893, 466.477572127796), (-1127.97394098372, 227.204274477751), (-354.478233703349, 71.6478660875927), (-75.1242017393757, 15.2897178747400), (-10.8753180355343, 2.23691159816033), (-1.06221498588947, 0.221624321934227), (-0.670191154593408E-01, 0.142363763154724E-01), (-0.246781078275479E-02, 0.535617408889821E-03), (-0.402962525080404E-04, 0.896632837373868E-05)], 0.334801051324544E-02, 0.996727416185620),  # noqa: E501
    "Longley": ([(-3482258.63459582, 890420.383607373), (15.0618722713733, 84.9149257747669), (-0.358191792925910E-01, 0.334910077722432E-01), (-2.02022980381683, 0.488399681651699), (-1.03322686717359, 0.214274163161675), (-0.511041056535807E-01, 0.226073200069370), (1829.15146461355, 455.478499142212)], 304.854073561965, 0.995479004577296),  # noqa: E501
    "Wampler1": ([(1.00000000000000, 0.000000000000000), (1.00000000000000, 0.000000000000000), (1.00000000000000, 0.000000000000000), (1.00000000000000, 0.000000000000000), (1.00000000000000, 0.000000000000000), (1.00000000000000, 0.000000000000000)], 0.000000000000000, 1.00000000000000),  # noqa: E501
    "Wampler2": ([(1.00000000000000, 0.000000000000000), (0.100000000000000, 0.000000000000000), (0.100000000000000E-01, 0.000000000000000), (0.100000000000000E-02, 0.000000000000000), (0.100000000000000E-03, 0.000000000000000), (0.100000000000000E-04, 0.000000000000000)], 0.000000000000000, 1.00000000000000),  # noqa: E501
    "Wampler3": ([(1.00000000000000, 2152.32624678170), (1.00000000000000, 2363.55173469681), (1.00000000000000, 779.343524331583), (1.00000000000000, 101.475507550350), (1.00000000000000, 5.64566512170752), (1.00000000000000, 0.112324854679312)], 2360.14502379268, 0.999995559025820),  # noqa: E501
    "Wampler4": ([(1.00000000000000, 215232.624678170), (1.00000000000000, 236355.173469681), (1.00000000000000, 77934.3524331583), (1.00000000000000, 10147.5507550350), (1.00000000000000, 564.566512170752), (1.00000000000000, 11.2324854679312)], 236014.502379268, 0.957478440825662),  # noqa: E501
    "Wampler5": ([(1.00000000000000, 21523262.4678170), (1.00000000000000, 23635517.3469681), (1.00000000000000, 7793435.24331583), (1.00000000000000, 1014755.07550350), (1.00000000000000, 56456.6512170752), (1.00000000000000, 1123.24854679312)], 23601450.2379268, 0.224668921574940E-02),  # noqa: E501
}
# fmt: on
DEGREE = {"Pontius": 2, "Filip": 10, **{f"Wampler{i}": 5 for i in range(1, 6)}}  # polynomial models in x
COEF_DIGITS = {"Filip": 6.0, "Wampler5": 6.0, "Wampler4": 7.5}  # the rest: 9


def nist_rows(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's predictors (powers of x for the polynomial models) and response, in float64."""
    text = (NIST / f"{name}.dat").read_text().splitlines()
    first, last = map(int, re.search(r"Data\s+\(lines (\d+) to (\d+)\)", "\n".join(text)).groups())
    data = np.array([[float(v) for v in line.split()] for line in text[first - 1 : last]])
    y, x = data[:, 0], data[:, 1:]
    if name in DEGREE:
        x = np.column_stack([x[:, 0] ** d for d in range(1, DEGREE[name] + 1)])
    return x, y


def lre(estimate: float, certified: float) -> float:
    """Log relative error: the number of correct digits (absolute where the certified value is 0)."""
    error = abs(estimate - certified) / (abs(certified) if certified else 1.0)
    return 15.0 if error == 0 else min(15.0, -math.log10(error))


def exact_fit_and_trainer(dm, quiet, **kwargs):
    model = LeastSquaresRegressor(dm.num_features, dm.num_targets, feature_names=dm.feature_names,
                                  target_names=dm.target_names, **kwargs)  # fmt: skip
    trainer = L.Trainer(max_epochs=1, **quiet)
    trainer.fit(model, dm)
    return model, trainer


def exact_fit(dm, quiet, **kwargs):
    return exact_fit_and_trainer(dm, quiet, **kwargs)[0]


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [131_072, 8])
def test_nist_certified_values_through_the_trainer_from_csv(tmp_path, quiet, batch_size):
    for name, (coefficients, residual_sd, r2) in CERTIFIED.items():
        x, y = nist_rows(name)
        columns = [f"x{i}" for i in range(x.shape[1])]
        path = tmp_path / f"{name}.csv"
        path.write_text(",".join([*columns, "y"]) + "\n" + "".join(
            ",".join(f"{v:.17g}" for v in row) + "\n" for row in np.column_stack([x, y])))  # fmt: skip
        dm = CropYieldDataModule(data_path=path, target_names=["y"], batch_size=batch_size, shuffle=False)
        no_intercept = name.startswith("NoInt")
        model = exact_fit(dm, quiet, fit_intercept=not no_intercept)
        got = model.summary().to_dict()["targets"]["y"]
        terms = list(got["terms"].values())
        assert len(terms) == len(coefficients), name
        need = COEF_DIGITS.get(name, 9.0)
        for term, (coef, sd) in zip(terms, coefficients, strict=True):
            assert lre(term["coef"], coef) >= need, (name, batch_size, term, coef)
            assert lre(term["std_err"], sd) >= 7, (name, batch_size, term, sd)
        assert lre(got["sigma"], residual_sd) >= 7, (name, batch_size, got["sigma"])
        assert lre(got["r2"], r2) >= 7, (name, batch_size, got["r2"])
        weight = model.solution.weight[0].numpy()  # the float64 solution the checkpoint keeps
        assert all(lre(w, c) >= need for w, (c, _) in zip(weight, coefficients[int(not no_intercept) :], strict=True))


# --- against statsmodels --------------------------------------------------------------------------


def heteroscedastic(rows: int = 50_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop-like float64 rows whose noise grows with the first feature (so HC0-HC3 differ from nonrobust)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, generator=g, dtype=torch.float64) * torch.tensor([12.0, 30.0, 12.0]) + torch.tensor(
        [80.0, 90.0, 55.0]
    )
    w = torch.tensor([[0.02, -0.01, 0.03], [0.01, 0.02, -0.015]], dtype=torch.float64)
    noise = torch.randn(rows, 2, generator=g, dtype=torch.float64) * (0.2 + ((x[:, :1] - 80) / 12).abs()) * 8
    return x, x @ w.T + torch.tensor([5.0, -3.0], dtype=torch.float64) + noise


def statsmodels_dict(x: np.ndarray, y: np.ndarray, cov_type: str, alpha: float, fit_intercept: bool = True) -> dict:
    """The to_dict() layout, every number from statsmodels' OLS results (one target)."""
    exog = sm.add_constant(x, prepend=True) if fit_intercept else x
    r = sm.OLS(y, exog).fit(cov_type=cov_type)
    low, high = r.conf_int(alpha).T
    names = (["Intercept"] if fit_intercept else []) + ["temp", "rainfall", "humidity"]
    return {
        "nobs": int(r.nobs), "df_model": int(r.df_model), "df_resid": int(r.df_resid),
        "condition_number": float(r.condition_number),
        "target": {
            "r2": r.rsquared, "adj_r2": r.rsquared_adj, "f": float(r.fvalue), "f_pvalue": float(r.f_pvalue),
            "sigma": math.sqrt(r.scale), "log_likelihood": r.llf, "aic": r.aic, "bic": r.bic,
            "terms": {n: {"coef": r.params[i], "std_err": r.bse[i], "t": r.tvalues[i], "p": r.pvalues[i],
                          "ci_low": low[i], "ci_high": high[i]} for i, n in enumerate(names)},
        },
    }  # fmt: skip


def assert_matches(got: dict, expected: dict, rel: float = 1e-7, rel_p: float | None = None) -> None:
    """Every number of ``got`` within ``rel`` of ``expected`` (the same keys, recursively); the
    p-values within ``rel_p`` (default ``rel``): a far tail's relative error is ``t²`` times ``t``'s."""
    assert set(got) == set(expected), (set(got), set(expected))
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_matches(got[key], value, rel, rel_p)
        elif isinstance(value, str):
            assert got[key] == value
        else:
            tol = rel_p if rel_p is not None and key in ("p", "f_pvalue") else rel
            assert math.isclose(got[key], value, rel_tol=tol, abs_tol=0), (key, got[key], value)


def assert_same_summary(got: dict, in_memory: dict) -> None:
    """A summary of the same rows, accumulated in other blocks (files, processes), equals the
    in-memory fit's to rounding: 1e-10 relative (p-values 1e-8)."""
    assert got["nobs"] == in_memory["nobs"] and got["df_resid"] == in_memory["df_resid"]
    assert_matches(got, in_memory, rel=1e-10, rel_p=1e-8)


def expected_summary(x, y, cov_type, alpha=0.05, fit_intercept=True) -> dict:
    per_target = [statsmodels_dict(x.numpy(), y[:, j].numpy(), cov_type, alpha, fit_intercept) for j in range(2)]
    head = {k: per_target[0][k] for k in ("nobs", "df_model", "df_resid", "condition_number")}
    targets = {name: t["target"] for name, t in zip(["apples", "oranges"], per_target, strict=True)}
    return {**head, "cov_type": cov_type, "alpha": alpha, "targets": targets}


SUMMARY_KEYS = ["nobs", "df_model", "df_resid", "cov_type", "alpha", "condition_number", "targets"]
TARGET_KEYS = ["r2", "adj_r2", "f", "f_pvalue", "sigma", "log_likelihood", "aic", "bic", "terms"]


@pytest.mark.parametrize("cov_type", ["nonrobust", "HC0", "HC1", "HC2", "HC3"])
def test_summary_equals_statsmodels_on_heteroscedastic_rows(quiet, cov_type):
    x, y = heteroscedastic()
    dm = CropYieldDataModule.from_tensors(x, y, batch_size=4096, shuffle=False)
    model = exact_fit(dm, quiet, cov_type=cov_type)
    got = model.summary(alpha=0.1).to_dict()
    assert list(got) == SUMMARY_KEYS and list(got["targets"]["apples"]) == TARGET_KEYS
    assert list(got["targets"]["apples"]["terms"]) == ["Intercept", "temp", "rainfall", "humidity"]
    assert isinstance(got["nobs"], int) and isinstance(got["df_model"], int) and isinstance(got["df_resid"], int)
    assert all(type(v) is float for v in got["targets"]["oranges"]["terms"]["temp"].values())
    assert_matches(got, expected_summary(x, y, cov_type, alpha=0.1))
    table = str(model.summary(alpha=0.1))
    assert table.count("OLS Regression Results") == 2 and f"Covariance Type:{cov_type:>22}" in table
    assert ("P>|z|" in table) == (cov_type != "nonrobust") and "[0.05" in table and "0.95]" in table


@pytest.mark.parametrize("cov_type", ["nonrobust", "HC1"])
def test_summary_through_the_origin_equals_statsmodels_without_a_constant(quiet, cov_type):
    x, y = heteroscedastic(5000, seed=1)
    dm = CropYieldDataModule.from_tensors(x, y, batch_size=1000, shuffle=False)
    model = exact_fit(dm, quiet, fit_intercept=False, cov_type=cov_type)
    assert torch.equal(model.linear.bias, torch.zeros(2))
    assert_matches(model.summary().to_dict(), expected_summary(x, y, cov_type, fit_intercept=False))


@pytest.mark.parametrize("cov_type", ["nonrobust", "HC3"])
def test_prediction_intervals_equal_statsmodels_summary_frame(quiet, tmp_path, cov_type):
    x, y = heteroscedastic(5000, seed=2)
    dm = CropYieldDataModule.from_tensors(x, y, batch_size=512, shuffle=False)
    model, trainer = exact_fit_and_trainer(dm, quiet, cov_type=cov_type)
    trainer.save_checkpoint(tmp_path / "exact.ckpt")
    sources = (model, load_regressor(tmp_path / "exact.ckpt"), LinearPredictor.from_checkpoint(tmp_path / "exact.ckpt"))
    new = torch.tensor([[75.0, 63.0, 44.0], [100.0, 150.0, 70.0], [80.0, 90.0, 55.0]], dtype=torch.float64)
    for j in range(2):
        frame = sm.OLS(y[:, j].numpy(), sm.add_constant(x.numpy())).fit(cov_type=cov_type)
        frame = frame.get_prediction(sm.add_constant(new.numpy(), has_constant="add")).summary_frame(alpha=0.1)
        for kind, prefix in (("prediction", "obs_ci"), ("mean", "mean_ci")):
            for source in sources:
                got = predict(source, new, interval=0.9, kind=kind)
                np.testing.assert_allclose(got.mean[:, j], frame["mean"], rtol=1e-10)
                np.testing.assert_allclose(got.lower[:, j], frame[f"{prefix}_lower"], rtol=1e-9)
                np.testing.assert_allclose(got.upper[:, j], frame[f"{prefix}_upper"], rtol=1e-9)


def test_checkpoint_keeps_the_float64_solution_and_statistics_and_loads_weights_only(quiet, tmp_path):
    x, y = heteroscedastic(3000, seed=3)
    model, trainer = exact_fit_and_trainer(CropYieldDataModule.from_tensors(x, y, batch_size=700), quiet,
                                           cov_type="HC2")  # fmt: skip
    trainer.save_checkpoint(tmp_path / "exact.ckpt")
    saved = torch.load(tmp_path / "exact.ckpt", weights_only=True)["cropyield"]["exact"]
    design = np.c_[np.ones(3000), x.numpy()]
    solution = np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(saved["weight"].numpy(), solution[1:].T, rtol=1e-12)
    np.testing.assert_allclose(saved["bias"].numpy(), solution[0], rtol=1e-12)
    np.testing.assert_allclose(saved["rss"].numpy(), ((design @ solution - y.numpy()) ** 2).sum(0), rtol=1e-11)
    assert saved["weight"].dtype == torch.float64 and float(saved["count"]) == 3000 and saved["cov_type"] == "HC2"
    loaded = load_regressor(tmp_path / "exact.ckpt")
    assert_matches(loaded.summary().to_dict(), expected_summary(x, y, "HC2"))
    assert str(loaded.summary()) == str(model.summary())


def test_float64_rows_reach_the_accumulator_unrounded(quiet, tmp_path):
    # Features a million plus a few thousandths: float32 keeps none of the thousandths.
    g = torch.Generator().manual_seed(4)
    x = 1e6 + torch.randint(0, 1000, (400, 3), generator=g, dtype=torch.float64) / 1000
    y = (x - 1e6) @ torch.tensor([[2.0, -1.0, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64).T
    y = y + torch.randn(400, 2, generator=g, dtype=torch.float64) * 0.01
    rows = torch.cat([x, y], 1)
    write_csv(tmp_path / "d.csv", ["temp", "rainfall", "humidity", "apples", "oranges"],
              [[f"{v:.17g}" for v in row] for row in rows.tolist()])  # fmt: skip
    design = np.c_[x.numpy(), np.ones(400)]
    expected = np.linalg.lstsq(design, y.numpy(), rcond=None)[0][:3].T
    for dm in (CropYieldDataModule(data_path=tmp_path / "d.csv", batch_size=64),
               CropYieldDataModule(data_path=tmp_path / "d.csv", batch_size=64, streaming=True),
               CropYieldDataModule.from_tensors(x, y, batch_size=64)):  # fmt: skip
        model, _ = exact_fit_and_trainer(dm, quiet)
        np.testing.assert_allclose(model.solution.weight.numpy(), expected, rtol=1e-9)
    # The SGD variants keep float32 tables as before.
    dm = CropYieldDataModule.from_tensors(x, y, batch_size=64)
    L.Trainer(max_epochs=1, **quiet).fit(CropYieldRegressor(lr=1e-20), dm)
    assert dm.training_rows()[0].dtype == torch.float32


def test_summary_and_intervals_are_refused_where_no_exact_fit_backs_them(quiet):
    dm = CropYieldDataModule(batch_size=5)
    ridge, _ = exact_fit_and_trainer(dm, quiet, l2=10.0)
    with pytest.raises(CropYieldError, match=r"ridge fit \(l2=10\).*no ordinary least-squares"):
        ridge.summary()
    with pytest.raises(CropYieldError, match="ridge fit"):
        predict(ridge, [[75, 63, 44]], interval=0.95)
    sgd = CropYieldRegressor()
    with pytest.raises(CropYieldError, match="need an exact least-squares fit"):
        predict(sgd, [[75, 63, 44]], interval=0.95)
    with pytest.raises(CropYieldError, match="fit the model first"):
        LeastSquaresRegressor().summary()
    with pytest.raises(CropYieldError, match="cov_type must be one of"):
        LeastSquaresRegressor(cov_type="HC4")
    rows = torch.cat([torch.cat([dm.training_rows()[0], dm.training_rows()[0][:, :1]], 1)], 1)
    with pytest.warns(CropYieldWarning, match="singular"):
        singular, _ = exact_fit_and_trainer(CropYieldDataModule.from_tensors(rows, dm.training_rows()[1]), quiet)
    with pytest.raises(CropYieldError, match=r"singular \(collinear column\(s\) \['feature_0', 'feature_3'\]\)"):
        singular.summary()


def test_report_summary_and_predict_interval_commands(tmp_path, tutorial_csv):
    run("cropyield", "fit", "--config", "exact.yaml", "--data.data_path", tutorial_csv, cwd=tmp_path)
    table = run("cropyield-report", "--ckpt", "checkpoints/last.ckpt", "--summary", cwd=tmp_path).stdout
    assert table.count("OLS Regression Results") == 2
    got = json.loads(run("cropyield-report", "--ckpt", "checkpoints/last.ckpt", "--summary", "--json",
                         cwd=tmp_path).stdout)  # fmt: skip
    from cropyield import INPUTS, TARGETS

    assert_matches(got, expected_summary(INPUTS.double(), TARGETS.double(), "nonrobust"), rel=1e-9)
    result = run("cropyield-predict", "--ckpt", "checkpoints/last.ckpt", "75", "63", "44", "--interval", "0.95",
                 "--json", cwd=tmp_path)  # fmt: skip
    (row,) = json.loads(result.stdout)
    assert list(row) == ["apples", "apples_lower", "apples_upper", "oranges", "oranges_lower", "oranges_upper"]
    frame = sm.OLS(TARGETS[:, 0].double().numpy(), sm.add_constant(INPUTS.double().numpy())).fit()
    frame = frame.get_prediction(np.array([[1.0, 75, 63, 44]])).summary_frame(alpha=0.05)
    assert math.isclose(row["apples_lower"], frame["obs_ci_lower"][0], rel_tol=1e-9)
    assert math.isclose(row["apples_upper"], frame["obs_ci_upper"][0], rel_tol=1e-9)
    run("cropyield-predict", "--ckpt", "checkpoints/last.ckpt", "--csv", tutorial_csv, "--interval", "0.9",
        "--kind", "mean", "--out", "p.csv", cwd=tmp_path)  # fmt: skip
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    # The input holds the targets: every prediction column is prefixed predicted_.
    predicted = ",".join(f"predicted_{t}{s}" for t in ("apples", "oranges") for s in ("", "_lower", "_upper"))
    assert header == "temp,rainfall,humidity,apples,oranges," + predicted
    # An SGD checkpoint has neither: one line, exit 2.
    run("cropyield", "fit", "--trainer.max_epochs", "2", "--trainer.default_root_dir", "sgd", cwd=tmp_path)
    sgd = "sgd/checkpoints/last.ckpt"
    result = run("cropyield-report", "--ckpt", sgd, "--summary", cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, "CropYieldRegressor checkpoint has no least-squares statistics")
    result = run("cropyield-predict", "--ckpt", sgd, "75", "63", "44", "--interval", "0.95", cwd=tmp_path,
                 check_rc=None)  # fmt: skip
    assert_one_line_error(result, "prediction intervals need an exact least-squares fit")


def test_streamed_folder_summary_equals_statsmodels(quiet, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = heteroscedastic(6000, seed=5)
    (tmp_path / "d").mkdir()
    names = ["temp", "rainfall", "humidity", "apples", "oranges"]
    rows = torch.cat([x, y], 1).numpy()
    for i, part in enumerate(np.array_split(rows, 3)):
        pq.write_table(pa.table({n: part[:, j] for j, n in enumerate(names)}), tmp_path / "d" / f"{i}.parquet",
                       row_group_size=700)  # fmt: skip
    dm = CropYieldDataModule(data_path=tmp_path / "d", streaming=True, batch_size=500)
    model, _ = exact_fit_and_trainer(dm, quiet, cov_type="HC3")
    streamed = model.summary().to_dict()
    assert_matches(streamed, expected_summary(x, y, "HC3"))
    # The same rows in memory, in other blocks: the same summary to rounding.
    in_memory = exact_fit(CropYieldDataModule.from_tensors(x, y, batch_size=4096, shuffle=False), quiet, cov_type="HC3")
    assert_same_summary(streamed, in_memory.summary().to_dict())
