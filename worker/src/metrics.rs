//! Evaluation metrics: AUC, GAUC, logloss, Recall@K, MRR@K.
