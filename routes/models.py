"""``/v1/models``: the served model and the OpenAI names it answers to."""

from __future__ import annotations

import time

from fastapi import APIRouter

from protocol import ModelCard, ModelList
from routes.deps import HIGGS_MODEL_NAMES, MODEL_ALIASES, SettingsDep, check_model

router = APIRouter(prefix="/v1/models", tags=["models"])

# ``created`` of every name: when this server started serving them (OpenAI's is fixed per model, too).
CREATED = int(time.time())


@router.get("", response_model=ModelList)
async def list_models(settings: SettingsDep) -> ModelList:
    """Every model name this server accepts."""
    names = [settings.served_model_name, *MODEL_ALIASES, *HIGGS_MODEL_NAMES]
    return ModelList(data=[ModelCard(id=name, created=CREATED) for name in names])


@router.get("/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, settings: SettingsDep) -> ModelCard:
    """One model name; 404 for a name this server does not accept."""
    check_model(settings, model_id)
    return ModelCard(id=model_id, created=CREATED)
