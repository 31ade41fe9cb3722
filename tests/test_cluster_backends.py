"""Both Leiden implementations (igraph, leidenalg) optimise the same objective."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cellmill.config import ConfigError, load_config
from cellmill.stages.clustering.in_memory import cluster_labels, modularity_clusters
from cellmill.stages.neighbors import snn_graph
from cellmill.stages.shared.knn import exact_knn


def test_leiden_backends_agree():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 6, (5, 10))
    truth = rng.integers(0, 5, 1500)
    pts = centers[truth] + rng.normal(0, 1, (1500, 10))
    idx, _ = exact_knn(pts, 20)
    snn = snn_graph(idx)
    a = cluster_labels(snn, "leiden", 0.3, 0, -1, "igraph")
    b = cluster_labels(snn, "leiden", 0.3, 0, -1, "leidenalg")
    assert adjusted_rand_score(a, b) > 0.99 and adjusted_rand_score(a, truth) > 0.99
    _, qa = modularity_clusters(snn, "leiden", 0.3, leiden_backend="igraph")
    _, qb = modularity_clusters(snn, "leiden", 0.3, leiden_backend="leidenalg")
    assert abs(qa - qb) < 1e-3


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="leiden_backend"):
        load_config(None, ["cluster.leiden_backend=networkx"])
