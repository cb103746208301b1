"""The OpenAPI 3.1 document of the HTTP port's REST routes, served at GET /openapi.json.

It describes the OpenAI-compatible routes (`sia.http.openai_api`) and the native task
routes (`sia.http.tasks_api`): the bearer security scheme, the request and answer bodies
and the error shape every route shares. Kept by hand beside the handlers.
"""

from __future__ import annotations

import copy
from typing import Any

from sia import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthenticated"},
    "403": {"$ref": "#/components/responses/Forbidden"},
    "429": {"$ref": "#/components/responses/TooManyRequests"},
    "503": {"$ref": "#/components/responses/Unavailable"},
    "default": {"$ref": "#/components/responses/Error"},
}
_NOT_FOUND = {"404": {"$ref": "#/components/responses/NotFound"}}
#: What a generation answers besides _ERRORS; after a 502 or 504 the images may have been
#: made and billed, so those carry `X-Should-Retry: false`.
_GENERATION_ERRORS = {
    "413": {"$ref": "#/components/responses/TooLarge"},
    "502": {"$ref": "#/components/responses/ImagesFailed"},
    "504": {"$ref": "#/components/responses/Timeout"},
}
_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 64},
}

_GENERATION_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string", "maxLength": 4000},
    "model": {"type": "string", "description": "empty or absent: the server's default model"},
    "n": {"type": "integer", "minimum": 1, "description": "> 1: a sequential group"},
    "size": {"type": "string", "description": "WIDTHxHEIGHT, 1K/2K/4K, or auto"},
    "response_format": {"type": "string", "enum": ["url", "b64_json"], "default": "url"},
    "seed": {"type": "integer"},
    "guidance_scale": {"type": "number"},
    "watermark": {"type": "boolean"},
}

_IMAGE = {
    "type": "object",
    "required": ["index"],
    "properties": {
        "index": {"type": "integer"},
        "url": {"type": "string"},
        "b64_json": {"type": "string"},
        "size": {"type": "string"},
        "content_type": {"type": "string"},
        "error": _ref("ImageError"),
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "ImageError": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    },
    "GenerationRequest": {
        "type": "object",
        "required": ["prompt"],
        "properties": _GENERATION_FIELDS,
    },
    "ImagesResponse": {
        "type": "object",
        "required": ["created", "data"],
        "properties": {
            "created": {"type": "integer"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"url": {"type": "string"}, "b64_json": {"type": "string"}},
                },
            },
            "usage": {"type": "object"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
            },
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "TaskRequest": {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            **_GENERATION_FIELDS,
            "images": {
                "type": "array",
                "items": {"type": "string"},
                "description": "reference images: http(s) URLs or data URIs",
            },
            "request_id": {"type": "string", "description": "idempotency key per API key"},
            "webhook_url": {"type": "string", "format": "uri"},
            "webhook_each_image": {"type": "boolean"},
        },
    },
    "Task": {
        "type": "object",
        "required": ["id", "object", "status", "images", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "task"},
            "status": {
                "type": "string",
                "enum": ["queued", "running", "succeeded", "failed", "cancelled"],
            },
            "model": {"type": "string"},
            "request_id": {"type": "string"},
            "n": {"type": "integer"},
            "images": {"type": "array", "items": _IMAGE},
            "usage": {
                "type": ["object", "null"],
                "properties": {
                    "generated_images": {"type": "integer"},
                    "output_tokens": {"type": "integer"},
                },
            },
            "error": {"oneOf": [_ref("ImageError"), {"type": "null"}]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "TaskList": {
        "type": "object",
        "required": ["object", "data", "next_page_token"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Task")},
            "next_page_token": {"type": "string", "description": "empty on the last page"},
        },
    },
}


def _error_response(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_PATHS: dict[str, Any] = {
    "/v1/images/generations": {
        "post": {
            "operationId": "createImage",
            "summary": "Generate an image or a sequential group (OpenAI-compatible)",
            "tags": ["openai"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("GenerationRequest")}},
            },
            "responses": {
                "200": _json(_ref("ImagesResponse"), "the images"),
                **_GENERATION_ERRORS,
                **_ERRORS,
            },
        }
    },
    "/v1/images/edits": {
        "post": {
            "operationId": "createImageEdit",
            "summary": "Generate from uploaded reference images (OpenAI-compatible)",
            "tags": ["openai"],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image", "prompt"],
                            "properties": {
                                "image": {
                                    "type": "array",
                                    "items": {"type": "string", "contentMediaType": "image/*"},
                                },
                                **_GENERATION_FIELDS,
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(_ref("ImagesResponse"), "the images"),
                **_GENERATION_ERRORS,
                **_ERRORS,
            },
        }
    },
    "/v1/models": {
        "get": {
            "operationId": "listModels",
            "summary": "The models the caller's key may use",
            "tags": ["openai"],
            "responses": {"200": _json(_ref("ModelList"), "the models"), **_ERRORS},
        }
    },
    "/v1/models/{model}": {
        "get": {
            "operationId": "retrieveModel",
            "summary": "One model",
            "tags": ["openai"],
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {"200": _json(_ref("Model"), "the model"), **_NOT_FOUND, **_ERRORS},
        }
    },
    "/v1/tasks": {
        "post": {
            "operationId": "createTask",
            "summary": "Submit an async task (one image, or a group with n > 1)",
            "tags": ["tasks"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("TaskRequest")}},
            },
            "responses": {
                "202": _json(_ref("Task"), "the task (the earlier one for a reused request_id)"),
                "409": _error_response("request_id reused for another request"),
                **_ERRORS,
            },
        },
        "get": {
            "operationId": "listTasks",
            "summary": "The caller's tasks, newest first",
            "tags": ["tasks"],
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "schema": {
                        "type": "string",
                        "enum": ["queued", "running", "succeeded", "failed", "cancelled"],
                    },
                },
                {
                    "name": "page_size",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                },
                {"name": "page_token", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {"200": _json(_ref("TaskList"), "a page of tasks"), **_ERRORS},
        },
    },
    "/v1/tasks/{task_id}": {
        "parameters": [_TASK_ID],
        "get": {
            "operationId": "getTask",
            "summary": "A task: status, images so far, error, timestamps",
            "tags": ["tasks"],
            "responses": {"200": _json(_ref("Task"), "the task"), **_NOT_FOUND, **_ERRORS},
        },
        "delete": {
            "operationId": "cancelTask",
            "summary": "Cancel a queued or running task (400 once it has finished)",
            "tags": ["tasks"],
            "responses": {
                "200": _json(_ref("Task"), "the cancelled task"),
                **_NOT_FOUND,
                **_ERRORS,
            },
        },
    },
    "/v1/tasks/{task_id}/cancel": {
        "parameters": [_TASK_ID],
        "post": {
            "operationId": "cancelTaskPost",
            "summary": "Cancel a queued or running task (as DELETE /v1/tasks/{task_id})",
            "tags": ["tasks"],
            "responses": {
                "200": _json(_ref("Task"), "the cancelled task"),
                **_NOT_FOUND,
                **_ERRORS,
            },
        },
    },
    "/v1/tasks/{task_id}/events": {
        "parameters": [_TASK_ID],
        "get": {
            "operationId": "taskEvents",
            "summary": "Server-Sent Events of a task until it has ended",
            "description": (
                "`event: task` with the task JSON now and at every change, ending after the "
                "final state; `event: error` with an Error body if the watch fails (shutdown)."
            ),
            "tags": ["tasks"],
            "responses": {
                "200": {
                    "description": "an event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **_NOT_FOUND,
                **_ERRORS,
            },
        },
    },
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "SIA image API",
        "version": __version__,
        "description": "OpenAI-compatible image routes and SIA's native task routes.",
    },
    "security": [{"bearer": []}],
    "tags": [
        {"name": "openai", "description": "OpenAI Images API subset"},
        {"name": "tasks", "description": "SIA async tasks"},
    ],
    "paths": _PATHS,
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "an SIA API key: Authorization: Bearer <key>",
            }
        },
        "schemas": _SCHEMAS,
        "responses": {
            "BadRequest": _error_response("invalid argument or failed precondition"),
            "Unauthenticated": _error_response("no valid API key"),
            "Forbidden": _error_response("the key may not do this"),
            "NotFound": _error_response("no such task or model (for this key)"),
            "TooManyRequests": _error_response("a limit was reached; see Retry-After"),
            "Unavailable": _error_response("unavailable; see Retry-After"),
            "TooLarge": _error_response("the body is over GRPC_MAX_MESSAGE_MB"),
            "ImagesFailed": _error_response(
                "every image of the group failed upstream (X-Should-Retry: false)"
            ),
            "Timeout": _error_response(
                "the deadline or IMAGE_TIMEOUT passed (X-Should-Retry: false)"
            ),
            "Error": _error_response("any other error"),
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the OpenAPI 3.1 document."""
    return copy.deepcopy(_DOCUMENT)
