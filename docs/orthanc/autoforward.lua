-- Orthanc: forward every CT or MR series to radai once it is stable.
--
-- Install: list this file in Orthanc's "LuaScripts" and declare radai in "DicomModalities" under the name
-- "radai", e.g. "radai": ["RADAI", "radai.example.org", 11112]. Orthanc calls OnStableSeries once a series
-- has received no new instance for "StableAge" seconds.
--
-- It cannot loop on radai's results: they arrive as new series (SEG, SR, SC, PR), which are not CT or MR,
-- and they do not touch the source series, so its stable event does not fire again. A source series that
-- gets more instances later becomes stable again and is forwarded again; radai stores re-sent instances
-- idempotently and its result UIDs are deterministic, so the PACS gets the same objects, updated.

local RADAI = 'radai'
local MODALITIES = { CT = true, MR = true }

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  if MODALITIES[modality] then
    print('radai: forwarding a stable ' .. modality .. ' series')
    RestApiPost('/modalities/' .. RADAI .. '/store', seriesId)
  end
end
