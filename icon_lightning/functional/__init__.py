"""Pure tensor maths of I-Con. Depends on torch only; nothing here knows about Lightning, W&B or FAISS.

Shape letters: B anchors, M candidates, D dim, K clusters, k neighbours.
"""

from icon_lightning.functional.checks import check_alpha, check_finite, check_positive, check_shape
from icon_lightning.functional.cluster import log_cluster_affinity, log_debiased_cluster_affinity, log_matmul_exp
from icon_lightning.functional.contrastive import beta_pmi, entropy, sc_infonce, scan_consistency, weighted_beta_pmi
from icon_lightning.functional.debias import debias, log_debias
from icon_lightning.functional.distances import cosine_similarity, pairwise_sqeuclidean
from icon_lightning.functional.divergence import kl_divergence
from icon_lightning.functional.kernels import log_exponential_kernel, log_student_t_kernel
from icon_lightning.functional.masking import masked_log_softmax, normalize_rows, self_pairs_valid
from icon_lightning.functional.matching import confusion_matrix, hungarian_accuracy
from icon_lightning.functional.perplexity import gaussian_log_affinity, sigma_for_perplexity
from icon_lightning.functional.propagation import propagate

__all__ = [
    "beta_pmi",
    "check_alpha",
    "confusion_matrix",
    "hungarian_accuracy",
    "check_finite",
    "check_positive",
    "check_shape",
    "cosine_similarity",
    "debias",
    "entropy",
    "gaussian_log_affinity",
    "kl_divergence",
    "log_cluster_affinity",
    "log_debias",
    "log_debiased_cluster_affinity",
    "log_exponential_kernel",
    "log_matmul_exp",
    "log_student_t_kernel",
    "masked_log_softmax",
    "normalize_rows",
    "pairwise_sqeuclidean",
    "propagate",
    "sc_infonce",
    "scan_consistency",
    "weighted_beta_pmi",
    "self_pairs_valid",
    "sigma_for_perplexity",
]
