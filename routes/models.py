"""``/v1/models``: the served model and the OpenAI names it answers to; ``/v1/audio/models``: those a speech
request takes, in the shape Open WebUI reads for its model list."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from protocol import ModelCard, ModelList
from routes.deps import HIGGS_MODEL_NAMES, MODEL_ALIASES, SettingsDep, check_model

router = APIRouter(tags=["models"])
# OpenAI's speech model names, in the order a model list offers them.
SPEECH_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")

# ``created`` of every name: when this server started serving them (OpenAI's is fixed per model, too).
CREATED = int(time.time())


@router.get("/v1/models", response_model=ModelList)
async def list_models(settings: SettingsDep) -> ModelList:
    """Every model name this server accepts."""
    names = [settings.served_model_name, *MODEL_ALIASES, *HIGGS_MODEL_NAMES]
    return ModelList(data=[ModelCard(id=name, created=CREATED) for name in names])


@router.get("/v1/audio/models")
async def list_speech_models(settings: SettingsDep) -> JSONResponse:
    """The names ``/v1/audio/speech`` takes, as OpenAI's model list (``data``) and in ``models`` as Open
    WebUI reads a custom speech server's list (``GET {base}/audio/models``; a 404 left it logging an error
    and offering ``tts-1`` and ``tts-1-hd`` alone: a trial of apps' requests)."""
    names = [settings.served_model_name, *SPEECH_MODELS]
    return JSONResponse(
        {
            "object": "list",
            "data": [ModelCard(id=name, created=CREATED).model_dump() for name in names],
            "models": [{"id": name, "name": name} for name in names],
        }
    )


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, settings: SettingsDep) -> ModelCard:
    """One model name; 404 for a name this server does not accept."""
    check_model(settings, model_id)
    return ModelCard(id=model_id, created=CREATED)
