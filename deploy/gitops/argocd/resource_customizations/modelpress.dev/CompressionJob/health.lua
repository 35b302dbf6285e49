-- Argo CD health of a ModelPress CompressionJob (modelpress.dev/CompressionJob).
-- A job runs to completion: Progressing while it waits or compresses, Healthy once its model is
-- published, Degraded with the reason when it failed or is stalled on something a person must fix,
-- Suspended while runtime.suspend is set.
-- It reads what the operator writes: status.observedGeneration, status.phase, the kstatus
-- conditions (Ready, Reconciling, Stalled), status.progress, status.result and status.failure.
local hs = {}

local function condition(status, kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function explained(head, detail)
  if detail ~= nil and detail ~= "" then
    return head .. ": " .. detail
  end
  return head
end

local status = obj.status
if status == nil or status.observedGeneration == nil or status.observedGeneration < 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the ModelPress operator to pick up the job"
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration ~= obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the ModelPress operator to observe generation " .. obj.metadata.generation
  return hs
end

local stalled = condition(status, "Stalled")
if status.phase == "Failed" or is_true(stalled) then
  local failure = status.failure or {}
  local reason = failure.reason or (stalled and stalled.reason) or "Failed"
  hs.status = "Degraded"
  hs.message = explained(reason, failure.message or (stalled and stalled.message))
  return hs
end

if status.phase == "Succeeded" or is_true(condition(status, "Ready")) then
  local result = status.result or {}
  hs.status = "Healthy"
  hs.message = "Compressed model at " .. (result.uri or "the output URI")
  if result.ratio ~= nil then
    hs.message = hs.message .. string.format(" (%.1fx smaller)", result.ratio)
  end
  return hs
end

local reconciling = condition(status, "Reconciling")
local phase = status.phase or "Pending"
local head = phase
if reconciling ~= nil and reconciling.reason ~= nil and reconciling.reason ~= phase then
  head = phase .. " (" .. reconciling.reason .. ")"
end
local detail = reconciling and reconciling.message
local progress = status.progress
if progress ~= nil and progress.percent ~= nil then
  detail = (progress.stage or "working") .. " " .. progress.percent .. "%"
  if progress.layersDone ~= nil and progress.layersTotal ~= nil then
    detail = detail .. ", layer " .. progress.layersDone .. " of " .. progress.layersTotal
  end
end
if phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
hs.message = explained(head, detail)
return hs
