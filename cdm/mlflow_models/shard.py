# MLflow "model from code" for one shard: executed by mlflow on load; nothing is unpickled.
from mlflow.models import set_model

from cdm.platform.models.serving import ShardModel

set_model(ShardModel())
