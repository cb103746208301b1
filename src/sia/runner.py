"""Running a task: the generation, its images kept, a group's progress, its webhooks.

`TaskRunner` is what the task backends' workers call with each task they
claim. Tasks always ask the provider for image bytes (their results must
outlive the provider's URLs, which Ark's do not past 24 h) and keep every
image in the blob store. A group shows each image as it arrives: stored,
written to the task (`TaskBackend.progress`, so GetImageTask and watchers see
it while the task runs) and, when asked, posted to the task's webhook.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sia import images
from sia.domain import GenerationResult, ImageError, ResponseFormat, TaskStatus, Usage, utcnow
from sia.errors import ImageStoreUnavailable, SiaError
from sia.images import as_bytes, with_images
from sia.logs import get_logger
from sia.tasks.errors import INTERNAL
from sia.webhooks import TASK_FAILED, TASK_IMAGE, TASK_SUCCEEDED

if TYPE_CHECKING:
    from sia.domain import GeneratedImage, Task
    from sia.service import ImageService

log = get_logger("sia.runner")


class TaskRunner:
    """Runs one claimed task to its result; see the module docstring."""

    def __init__(self, service: ImageService) -> None:
        self.service = service

    async def __call__(self, task: Task) -> GenerationResult:
        """Generate `task`'s images and keep them; raise SiaError for the task's failure.

        The generation is billed: a failing blob store is retried, never the
        generation. Its key is checked again (revoked: KeyRevoked; over a quota
        or budget: QuotaExceeded) and the account's images per minute waited for.
        """
        service, request = self.service, as_bytes(task.request)
        kept: dict[int, GeneratedImage] = {}

        async def on_image(image: GeneratedImage) -> None:
            try:
                image = kept[image.index] = await service.images.keep(image)
            except ImageStoreUnavailable:
                return  # the bytes stay with the result: the end stores them, with retries
            partial = GenerationResult(
                model=request.model,
                images=tuple(kept[index] for index in sorted(kept)),
                usage=Usage(generated_images=sum(1 for i in kept.values() if i.ok)),
            )
            await service.tasks.progress(task.id, partial, attempt=task.attempts)
            if request.webhook_images:
                await self._post(task, TASK_IMAGE, shown=(partial, TaskStatus.RUNNING), image=image)

        progress = on_image if request.sequential else None
        try:
            if service.access is None:
                result = await service.call_provider(request, None, task.owner, progress)
            else:
                async with service.access.running(task.owner, request):
                    result = await service.call_provider(request, None, task.owner, progress)
            result = await service.images.keep_all(
                with_images(result, kept), retry_delays=images.STORE_RETRY_DELAYS
            )
        except Exception as exc:  # a bug fails the task INTERNAL: its webhook is told so too
            if request.webhook_url:
                failed = dataclasses.replace(
                    task, status=TaskStatus.FAILED, finished_at=utcnow(), error=_error(exc)
                )
                await self._post(failed, TASK_FAILED)
            raise
        if request.webhook_url:
            await self._post(task, TASK_SUCCEEDED, shown=(result, TaskStatus.SUCCEEDED))
        return result

    async def abandoned(self, task: Task) -> None:
        """A task its backend failed ABANDONED without running it: its webhook hears
        task.failed, as it would from a run that failed."""
        if task.request.webhook_url:
            await self._post(task, TASK_FAILED)

    async def _post(
        self,
        task: Task,
        kind: str,
        *,
        shown: tuple[GenerationResult, TaskStatus] | None = None,
        image: GeneratedImage | None = None,
    ) -> None:
        """Store a webhook event of `task` (`shown`: as `_shown` makes it, with that result
        and status); a failure here never fails the task (its images are generated and
        billed): the fault is logged and the event lost."""
        webhooks = self.service.webhooks
        if webhooks is None:
            return
        try:
            if shown is not None:
                task = await self._shown(task, *shown)
            await webhooks.enqueue(task, kind, image=image)
        except Exception as exc:  # the task's outcome stands whatever the webhooks do
            log.error("webhook_event_lost", task_id=task.id, kind=kind, error=repr(exc)[:200])

    async def _shown(self, task: Task, result: GenerationResult, status: TaskStatus) -> Task:
        """`task` as a webhook shows it: `status`, with `result`'s images as links."""
        linked = await self.service.images.materialize(result, ResponseFormat.URL)
        finished = utcnow() if status.is_terminal else None
        return dataclasses.replace(task, status=status, result=linked, finished_at=finished)


def _error(exc: Exception) -> ImageError:
    """What the task stores for `exc` (as `tasks.errors.runner_failure` decides)."""
    return ImageError(exc.reason, exc.message) if isinstance(exc, SiaError) else INTERNAL
