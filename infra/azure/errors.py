"""Azure's failures turned into sentences a user can act on.

The SDK has already retried what is worth retrying (429 after Retry-After, 408, 5xx) by the time an
exception reaches here, so each answer says what to do next rather than "try again" blindly.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

SUGGESTED_SIZES = ("Standard_B2s", "Standard_B2ms", "Standard_B2as_v2", "Standard_D2as_v5", "Standard_D2s_v5")
SUGGESTED_REGIONS = ("eastus", "eastus2", "westus2", "northeurope", "westeurope", "uksouth")


class AzureActionError(RuntimeError):
    """A failure with an actionable message (printed as is, no traceback)."""


def error_code(exc: HttpResponseError) -> str:
    """The ARM error code (e.g. SkuNotAvailable), from the parsed error or the status."""
    err = getattr(exc, "error", None)
    code = getattr(err, "code", None) if err is not None else None
    return code or (f"HTTP{exc.status_code}" if exc.status_code else "Unknown")


def explain_message(exc: HttpResponseError) -> str:
    err = getattr(exc, "error", None)
    msg = getattr(err, "message", None) if err is not None else None
    return (msg or exc.message or str(exc)).strip().splitlines()[0]


WRONG_TENANT = ("InvalidAuthenticationTokenTenant", "InvalidAuthenticationTokenAudience")
SIGN_IN_HELP = (
    "Sign in with `az login`, or for a service principal set AZURE_TENANT_ID, AZURE_CLIENT_ID and "
    "AZURE_CLIENT_SECRET."
)
# Microsoft Entra sign-in codes (AADSTS...) that mean one thing to fix.
_AADSTS = {
    "7000215": "AZURE_CLIENT_SECRET is not a secret of that application: give the secret's Value, not "
    "its Secret ID, or make a new one (`az ad sp credential reset --id $AZURE_CLIENT_ID`), set "
    "AZURE_CLIENT_SECRET to it, and re-run.",
    "7000222": "the client secret has expired. Make a new one (`az ad sp credential reset --id "
    "$AZURE_CLIENT_ID`), set AZURE_CLIENT_SECRET to it, and re-run.",
    "700016": "no application with AZURE_CLIENT_ID exists in the tenant AZURE_TENANT_ID: check both "
    "(`az ad sp show --id $AZURE_CLIENT_ID`).",
    "90002": "the tenant AZURE_TENANT_ID does not exist: check it (`az account show --query tenantId`).",
    "900023": "AZURE_TENANT_ID is not a valid tenant id or domain: check it "
    "(`az account show --query tenantId`).",
    "50076": "the sign-in needs multi-factor authentication: run `az login` again, then re-run.",
    "70043": "the Azure CLI's sign-in has expired: run `az login` again, then re-run.",
    "700082": "the Azure CLI's sign-in has expired: run `az login` again, then re-run.",
}


def _sign_in(exc: ClientAuthenticationError) -> str:
    """A refused sign-in: which credential is wrong and how to fix it, from Entra's AADSTS code; not
    "no subscription found", which sends the user looking in the wrong place."""
    text = str(exc)
    match = re.search(r"AADSTS(\d+):?([^\n]*?(?:\.(?=\s)|$))", text)
    if match:
        code, said = match.group(1), match.group(2).strip()
        advice = _AADSTS.get(
            code,
            "check AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET, or sign in with `az login`.",
        )
        return f"Azure sign-in failed (AADSTS{code}: {said}): {advice}"
    return f"Azure sign-in failed: {text.strip().splitlines()[0]}\n{SIGN_IN_HELP}"


RESTRICTION_REASONS = {
    "NotAvailableForSubscription": "the region does not offer it to this subscription",
    "QuotaId": "this subscription's offer type (e.g. a free or student one) may not use it",
}


def capacity_refusal(
    *,
    size: str,
    region: str,
    count: int,
    vcpus: int,
    restriction: str | None,
    over: list[tuple[str, bool, int, int, int]],
    fitting: list[str],
) -> str:
    """Why `count` x `size` cannot run in `region`, asked of Azure before anything was created: the size
    is not offered (`restriction` None), restricted (its reasonCode), or `over` quotas, each as (label,
    whether it is the regional total, vCPUs in use, limit, vCPUs needed); then the sizes that would fit."""
    many = f"{count} x " if count > 1 else ""
    if restriction is None:
        lines = [f"VM size {size} is not offered in {region} (it is not in the region's SKU list)."]
    elif restriction:
        why = RESTRICTION_REASONS.get(restriction, "Azure restricts it there")
        lines = [
            f"VM size {size} is not available in {region} for this subscription: it is restricted "
            f"({restriction}: {why})."
        ]
    else:
        lines = []
        for label, regional, current, limit, need in over:
            what = "the region's total vCPU quota" if regional else f"the {label} quota"
            who = f"{many}{size} ({vcpus} vCPUs each)" if many else f"VM size {size} ({vcpus} vCPUs)"
            lines.append(
                f"{who} needs {need} more vCPUs, over "
                f"{what} in {region}: {current} of {limit} used, {max(limit - current, 0)} free."
            )
        family = next((label for label, regional, *_ in over if not regional), "")
        lines.append(
            "Ask for more vCPU quota (Azure portal → Subscriptions → Usage + quotas"
            + (f", {family}" if family else ", Total Regional vCPUs")
            + ")"
            + (", or use fewer --instances" if count > 1 else "")
            + ", or pick a size that fits."
        )
    if fitting:
        times = f" ({count} instances)" if count > 1 else ""
        lines.append(f"Sizes that fit{times} in {region}: {', '.join(fitting[:5])} (--size).")
    else:
        lines.append(
            f"No other size fits in {region} for this subscription: try another --region (e.g. "
            f"{', '.join([r for r in SUGGESTED_REGIONS if r != region.lower()][:3])})."
        )
    lines.append("Nothing was created: Azure was only asked what this subscription may run there.")
    return "\n".join(lines)


def explain(
    exc: BaseException,
    *,
    region: str = "",
    size: str = "",
    name: str = "",
    available_sizes: Callable[[], list[str]] | None = None,
) -> str:
    """A one-paragraph explanation of `exc` with the next step to take."""
    if isinstance(exc, HttpResponseError) and error_code(exc) in WRONG_TENANT:
        # ARM's 401 for a good token of another tenant: not a sign-in to repeat, a tenant to choose
        return (
            f"the subscription belongs to another Microsoft Entra tenant than the one you signed in to "
            f"({error_code(exc)}): {explain_message(exc)}\nSign in to its tenant (`az login --tenant "
            "TENANT`, or set AZURE_TENANT_ID for a service principal), or pick a subscription of this "
            "tenant with --subscription (`az account list`)."
        )
    if isinstance(exc, ClientAuthenticationError):
        return _sign_in(exc)
    if isinstance(exc, ServiceRequestError | ServiceResponseError) and not isinstance(exc, HttpResponseError):
        return (
            f"could not reach Azure Resource Manager ({exc.__class__.__name__}: {exc}). Check the "
            "network (and AZURE_ARM_ENDPOINT if you set it), then re-run: deploy-azure picks up where "
            "it stopped."
        )
    if not isinstance(exc, HttpResponseError):
        return f"{exc.__class__.__name__}: {exc}"
    code, msg, status = error_code(exc), explain_message(exc), exc.status_code
    low = (code + " " + msg).lower()
    where = f" in {region}" if region else ""
    if code in ("AuthorizationFailed", "LinkedAuthorizationFailed") or status == 403:
        return (
            f"not allowed: {msg}\nYour Azure identity needs the Contributor role (or Owner) on the "
            "subscription or on the resource group; ask a subscription owner to grant it "
            "(`az role assignment create --role Contributor ...`), or pick another --subscription."
        )
    if (
        code in ("InvalidAuthenticationToken", "ExpiredAuthenticationToken", "AuthenticationFailed")
        or status == 401
    ):
        return f"Azure rejected the sign-in token ({code}). Run `az login` again, then re-run."
    if code in ("SubscriptionNotFound", "InvalidSubscriptionId", "SubscriptionNotRegistered"):
        return (
            f"subscription problem ({code}): {msg}\nCheck AZURE_SUBSCRIPTION_ID / --subscription "
            "against `az account list`."
        )
    if code == "MissingSubscriptionRegistration":
        return (
            f"{msg}\nRegister the provider once: `az provider register --namespace Microsoft.Compute` "
            "(and Microsoft.Network), then re-run."
        )
    if "hardware cluster" in low:
        return (
            f"{size or 'the new size'} is not offered by the hardware cluster the VM runs on, so it cannot "
            f"be resized there while allocated ({code}): {msg}\nDeallocate it first (`az vm deallocate "
            f"--resource-group {name}-rg --name {name}-vm`), then re-run deploy-azure: a deallocated VM "
            "can move to any size the region offers, and deploy-azure starts it again. Or pick a size "
            "the message lists."
        )
    if "quota" in low or code in ("QuotaExceeded", "OperationNotAllowed") and "cores" in low:
        return (
            f"quota exceeded{where}: {msg}\nAsk for more vCPU quota (Azure portal → Subscriptions → "
            f"Usage + quotas, family of {size or 'the VM size'}), or use a smaller --size or another "
            "--region."
        )
    if code == "SkuNotAvailable":
        others = []
        if available_sizes:
            try:
                others = [s for s in available_sizes() if s.lower() != size.lower()]
            except HttpResponseError:
                others = []
        hint = (
            f"Sizes available to you{where}: {', '.join(others[:4])} (--size)."
            if others
            else f"Try --size {SUGGESTED_SIZES[1]} or another --region (e.g. "
            f"{', '.join(SUGGESTED_REGIONS[:3])})."
        )
        return f"VM size {size or '(requested)'} is not available{where} for this subscription.\n{hint}"
    if code in ("AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest"):
        return (
            f"Azure has no capacity for {size or 'this size'}{where} right now ({code}).\nRe-run later, "
            "or choose another --size or --region."
        )
    if code == "DnsRecordInUse" or ("dns" in low and "in use" in low):
        return (
            f"the address {name}.{region}.cloudapp.azure.com is already taken by someone else's "
            "deployment: choose another --name."
        )
    if code == "ResourceGroupBeingDeleted":
        return f"deployment {name} is still being deleted; wait for that (a few minutes), then re-run."
    if code == "InvalidResourceGroupLocation":
        return (
            f"deployment {name} already exists in another region: {msg}\nUse that --region, another "
            "--name, or `invoke destroy-azure` first."
        )
    if code == "PropertyChangeNotAllowed":
        return (
            f"{msg}\nThat property is fixed once the VM exists: `invoke destroy-azure` and deploy again, "
            "or keep the old value."
        )
    if status == 409:
        return (
            f"conflict ({code}): {msg}\nAnother operation on the same resources may still be running; "
            "wait a minute and re-run (deploy-azure converges, it does not duplicate)."
        )
    if status == 429:
        return (
            "Azure is throttling this subscription (429) even after waiting as told by Retry-After; "
            "wait a few minutes and re-run."
        )
    if status and status >= 500:
        return (
            f"Azure had an internal error ({status} {code}) that persisted through retries: {msg}\n"
            "Re-run in a few minutes; deploy-azure converges, so nothing is duplicated."
        )
    if status in (200, 201, 202):
        return (
            f"an Azure operation was accepted but then failed ({code}): {msg}\nSee the message for the "
            "cause; re-run deploy-azure once it is fixed (it converges)."
        )
    return f"Azure refused the request ({status} {code}): {msg}"
