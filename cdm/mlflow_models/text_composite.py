# MLflow "model from code" for a text workspace's composite: executed by mlflow on load; nothing is unpickled.
from mlflow.models import set_model

from cdm.platform.models.text_serving import TextCompositeModel

set_model(TextCompositeModel())
