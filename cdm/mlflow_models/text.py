# MLflow "model from code" for a text workspace's model served alone (the base, a
# compartment or the paragon): executed by mlflow on load;
# nothing is unpickled.
from mlflow.models import set_model

from cdm.platform.models.text_serving import TextModel

set_model(TextModel())
