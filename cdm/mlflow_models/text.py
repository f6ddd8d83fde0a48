# MLflow "model from code" for a text workspace's model served alone (the base): executed by mlflow on load;
# nothing is unpickled.
from mlflow.models import set_model

from cdm.platform.serving import TextModel

set_model(TextModel())
