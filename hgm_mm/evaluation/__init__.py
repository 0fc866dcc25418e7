"""Evaluation: metric functions, room -> product evaluation of a model with its baselines, the whole
guide (`evaluate_guide`), and the report."""
from .evaluate import RetrievalEvaluation as RetrievalEvaluation
from .evaluate import baseline_evaluations as baseline_evaluations
from .evaluate import baseline_training_data as baseline_training_data
from .evaluate import SceneEvaluation as SceneEvaluation
from .evaluate import evaluate as evaluate
from .evaluate import evaluate_scenes as evaluate_scenes
from .evaluate import held_out_rooms as held_out_rooms
from .evaluate import popularity_scores as popularity_scores
from .report import check_report_folder as check_report_folder
from .report import write_report as write_report
from .guide import GuideEvaluation as GuideEvaluation
from .guide import RankingScores as RankingScores
from .guide import SceneSourceEvaluation as SceneSourceEvaluation
from .guide import SetScores as SetScores
from .guide import evaluate_guide as evaluate_guide
from .guide import format_guide_report as format_guide_report
