# MLflow "model from code" for the composite: executed by mlflow on load; nothing is unpickled.
from mlflow.models import set_model

from cdm.platform.models.serving import CompositeModel

set_model(CompositeModel())
