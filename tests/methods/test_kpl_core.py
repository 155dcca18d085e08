"""KPL cores: agreement with the authors' script (shared fixture), balancing marginals, top-k evidence, and proxy
learning recovering clusters that biased text proxies misclassify."""
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.methods.kpl import KPLConfig, balance, build_text_proxies, fit_kpl, fit_vision_proxies, predict, text_proxy
from tests.factories import shared_data_dir

READINGS = ("reference", "sinkhorn")
FIXTURE_KEYS = {"reference": ("P_reference", "W_reference"), "sinkhorn": ("P_intended", "W_intended")}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """2000 steps on 120 x 32 matrices: intra-op threads only add spin-waiting on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    data_dir = shared_data_dir()
    path = data_dir / "fixtures" / "kpl_reference.npz" if data_dir else None
    if path is None or not path.is_file():
        pytest.skip("no shared/data/fixtures/kpl_reference.npz in this checkout")
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


# --- the authors' script, on the shared fixture --------------------------------------------------------------------

def test_top_k_descriptions_match_the_script(reference: dict[str, np.ndarray]) -> None:
    images = torch.from_numpy(reference["X"])
    _, evidence = build_text_proxies(images, list(torch.from_numpy(reference["D"])), k=8)
    for kept, (indices, scores) in zip(reference["topk_indices"], evidence, strict=True):
        assert indices.tolist() == kept.tolist()                     # same descriptions, same (descending) order
        assert bool((scores[:-1] >= scores[1:]).all())


@pytest.mark.parametrize("reading", READINGS)
def test_pseudo_labels_match_the_script_in_float64(reference: dict[str, np.ndarray], reading: str) -> None:
    logits = torch.from_numpy(reference["X"] @ reference["T"])      # the fixture's (biased) T, not our proxies
    pseudo_labels = balance(logits, tau_t=0.01, iters=20, reading=reading)
    expected = torch.from_numpy(reference[FIXTURE_KEYS[reading][0]])
    assert pseudo_labels.dtype == torch.float64
    torch.testing.assert_close(pseudo_labels, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reading", READINGS)
def test_vision_proxies_match_the_script(reference: dict[str, np.ndarray], reading: str, dtype: torch.dtype) -> None:
    images = torch.from_numpy(reference["X"]).to(dtype)
    text_proxies = torch.from_numpy(reference["T"]).to(dtype)
    pseudo_labels = balance(images @ text_proxies, tau_t=0.01, iters=20, reading=reading)   # in dtype throughout
    vision_proxies = fit_vision_proxies(images, text_proxies, pseudo_labels, lr=10.0, iters=2000, tau_i=0.04,
                                        alpha=0.6)
    expected = torch.from_numpy(reference[FIXTURE_KEYS[reading][1]]).to(dtype)
    assert vision_proxies.dtype == dtype
    column_cosines = (vision_proxies * expected).sum(dim=0)
    assert bool((column_cosines >= 0.9999).all()), column_cosines.tolist()
    same_argmax = ((images @ vision_proxies).argmax(dim=1) == (images @ expected).argmax(dim=1)).double().mean()
    assert same_argmax >= 0.97                       # the note's bar: in float32 a late step-halving may flip


@pytest.mark.parametrize("reading", READINGS)
def test_float32_fit_agrees_with_float64(reference: dict[str, np.ndarray], reading: str) -> None:
    """The solvers iterate in float64 whatever they are given, so float32 serving gets the float64 answer (iterating
    in float32, late halving decisions flip and W drifts to 1 - cosine of 4e-7 to 9e-5 on this fixture)."""
    fits = {}
    for dtype in (torch.float64, torch.float32):
        images, text_proxies = torch.from_numpy(reference["X"]).to(dtype), torch.from_numpy(reference["T"]).to(dtype)
        pseudo_labels = balance(images @ text_proxies, tau_t=0.01, iters=20, reading=reading)
        fits[dtype] = fit_vision_proxies(images, text_proxies, pseudo_labels, lr=10.0, iters=2000, tau_i=0.04,
                                         alpha=0.6)
    column_cosines = (fits[torch.float64] * fits[torch.float32].double()).sum(dim=0)
    assert bool((column_cosines >= 1 - 1e-7).all()), column_cosines.tolist()


# --- balancing marginals --------------------------------------------------------------------------------------------

def random_logits(n: int = 90, c: int = 4, seed: int = 0) -> torch.Tensor:
    """Cosine-like logits with an unbalanced argmax (class 0 favoured)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 0.1 * torch.randn(n, c, generator=generator, dtype=torch.float64)
    logits[:, 0] += 0.05
    return logits


@pytest.mark.parametrize("prior", [None, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)])
def test_sinkhorn_reaches_the_requested_column_marginals(prior: torch.Tensor | None) -> None:
    logits = random_logits()
    n, c = logits.shape
    pseudo_labels = balance(logits, tau_t=0.05, iters=300, reading="sinkhorn", class_prior=prior)
    target = torch.full((c,), 1 / c, dtype=torch.float64) if prior is None else prior / prior.sum()
    torch.testing.assert_close(pseudo_labels.sum(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(pseudo_labels.sum(dim=0) / n, target, atol=1e-4, rtol=0)
    unbalanced = (logits / 0.05).softmax(dim=1).sum(dim=0) / n                # the same logits, unbalanced, are far off
    assert float((unbalanced - target).abs().max()) > 0.05


@pytest.mark.parametrize("prior", [None, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)])
def test_reference_rescales_one_line_per_iteration_to_its_target(prior: torch.Tensor | None) -> None:
    logits = random_logits()
    n, c = logits.shape
    q = torch.full((c,), 1 / c, dtype=torch.float64) if prior is None else prior / prior.sum()
    updated_columns = 0
    previous = balance(logits, tau_t=0.01, iters=0, reading="reference", class_prior=prior)
    torch.testing.assert_close(previous.sum(dim=1), torch.ones(n, dtype=torch.float64))   # softmax rows to start
    for iters in range(1, 21):
        current = balance(logits, tau_t=0.01, iters=iters, reading="reference", class_prior=prior)
        changed = current != previous
        rows, columns = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
        if len(columns) == 1:                                       # exactly one column rescaled, to q_j
            updated_columns += 1
            assert float(current[:, columns[0]].sum()) == pytest.approx(float(q[columns[0]]), abs=1e-12)
        else:                                                       # ... or exactly one row, to 1/n
            assert len(rows) == 1
            assert float(current[rows[0]].sum()) == pytest.approx(1 / n, abs=1e-12)
        previous = current
    assert updated_columns >= c                                     # every column got rescaled at least once
    row_sums = previous.sum(dim=1)
    assert float(row_sums.max()) < 5 / n                           # no row sums to 1: they are all near 1/n
    # 20 single-line steps: the columns stay near q (total mass near 1) but a later row step may move one a little
    torch.testing.assert_close(previous.sum(dim=0), q, atol=0.02, rtol=0)
    assert float(row_sums.mean()) == pytest.approx(1 / n, rel=0.02)


# --- top-k evidence and shapes -------------------------------------------------------------------------------------

def test_top_k_keeps_the_descriptions_planted_near_the_images() -> None:
    generator = torch.Generator().manual_seed(1)
    d, k = 32, 4
    direction = F.normalize(torch.randn(d, generator=generator), dim=0)
    images = F.normalize(direction + 0.3 * torch.randn(50, d, generator=generator) / d**0.5, dim=1)
    descriptions = F.normalize(torch.randn(20, d, generator=generator), dim=1)           # noise
    planted = [13, 2, 17, 8]
    closeness = torch.tensor([0.1, 0.3, 0.5, 0.7])                 # 13 is the closest, 8 the least close
    for index, noise in zip(planted, closeness, strict=True):
        descriptions[index] = F.normalize(direction + noise * torch.randn(d, generator=generator) / d**0.5, dim=0)
    proxy, indices, scores = text_proxy(images, descriptions, k)
    assert indices.tolist() == planted                                 # the planted ones, closest first
    torch.testing.assert_close(scores, (images @ descriptions[indices].T).mean(dim=0))
    torch.testing.assert_close(proxy, F.normalize(descriptions[planted].mean(dim=0), dim=0))


def test_k_larger_than_the_descriptions_keeps_them_all() -> None:
    generator = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(10, 16, generator=generator), dim=1)
    descriptions = F.normalize(torch.randn(5, 16, generator=generator), dim=1)
    proxy, indices, scores = text_proxy(images, descriptions, k=8)
    assert sorted(indices.tolist()) == [0, 1, 2, 3, 4] and scores.shape == (5,)
    assert float(proxy.norm()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("reading", READINGS)
def test_float32_in_float32_out(reading: str) -> None:
    generator = torch.Generator().manual_seed(3)
    n, d, c = 40, 16, 3
    images = F.normalize(torch.randn(n, d, generator=generator), dim=1)
    class_descriptions = [F.normalize(torch.randn(m, d, generator=generator), dim=1) for m in (4, 12, 9)]
    fit = fit_kpl(images, class_descriptions, KPLConfig(top_k_descriptions=8, balancing=reading, proxy_iters=50))
    assert fit.text_proxies.shape == fit.vision_proxies.shape == (d, c)
    assert fit.pseudo_labels.shape == (n, c)
    for tensor in (fit.text_proxies, fit.vision_proxies, fit.pseudo_labels):
        assert tensor.dtype == torch.float32 and bool(tensor.isfinite().all())
    torch.testing.assert_close(fit.vision_proxies.norm(dim=0), torch.ones(c))
    assert [len(e.indices) for e in fit.evidence] == [4, 8, 8]       # k' = min(k, m)
    probabilities = predict(images, fit.vision_proxies, tau_i=0.04)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (n, c)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(n))


# --- proxy learning fixes biased text proxies ----------------------------------------------------------------------

def biased_clusters(seed: int = 0, per_class: int = 50, d: int = 32, c: int = 3, n_descriptions: int = 20):
    """Three tight image clusters sharing an image-only direction (the modality gap), and descriptions sharing a
    text-only direction; class 0's descriptions lean twice as far toward cluster 1 as toward their own, so
    zero-shot sends most of cluster 1 to class 0 and argmax(X·T) is unbalanced."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]
    centres, image_gap, text_gap = basis[:c], basis[c], basis[c + 1]
    labels = torch.arange(c).repeat_interleave(per_class)
    noise = 0.8 * torch.randn(len(labels), d, generator=generator, dtype=torch.float64) / d**0.5
    images = F.normalize(1.5 * image_gap + centres[labels] + noise, dim=1)
    description_centres = centres.clone()
    description_centres[0] += 2.0 * centres[1]                      # the biased class
    class_descriptions = [
        F.normalize(text_gap + centre + 0.8 * torch.randn(n_descriptions, d, generator=generator,
                                                            dtype=torch.float64) / d**0.5, dim=1)
        for centre in description_centres]
    return images, labels, class_descriptions


@pytest.mark.parametrize("reading", READINGS)
def test_proxy_learning_recovers_clusters_that_zero_shot_misses(reading: str) -> None:
    # Both readings clear the bar here (seeds 0-7 of this construction: gains 16-35 points): the clusters are
    # balanced, so balancing the pseudo-labels undoes the text bias, and learning from the images removes the gap.
    images, labels, class_descriptions = biased_clusters()
    fit = fit_kpl(images, class_descriptions, KPLConfig(balancing=reading))
    zero_shot = float(((images @ fit.text_proxies).argmax(dim=1) == labels).double().mean())
    kpl = float((predict(images, fit.vision_proxies, tau_i=0.04).argmax(dim=1) == labels).double().mean())
    assert zero_shot < 0.8
    assert kpl >= 0.95
    assert kpl - zero_shot >= 0.15
