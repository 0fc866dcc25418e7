"""Evaluation: metric functions, and room -> product evaluation of a model with its baselines."""
from .evaluate import RetrievalEvaluation as RetrievalEvaluation
from .evaluate import baseline_evaluations as baseline_evaluations
from .evaluate import SceneEvaluation as SceneEvaluation
from .evaluate import evaluate as evaluate
from .evaluate import evaluate_scenes as evaluate_scenes
from .evaluate import popularity_scores as popularity_scores
