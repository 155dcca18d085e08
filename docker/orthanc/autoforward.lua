-- Auto-forwarding to medzero, as a hospital's PACS or router would do it: every newly stored image of a modality
-- medzero has routing rules for (docker/medzero/routes.yaml) is sent by C-STORE to the `medzero` modality of
-- orthanc.json (AE MEDZERO at medzero:11112). medzero classifies it and C-STOREs an AI Results SR back to ORTHANC
-- (MEDZERO_SR_DESTINATION). SR instances, and anything medzero itself sent, are never forwarded: no loop.
--
-- Loaded through "LuaScripts" in orthanc.json. SendToModality() inside OnStoredInstance queues an Orthanc job, so
-- storage is not held up by the send; a failed send stays visible under /jobs in the REST API (and can be resubmitted
-- there). To forward by hand instead, remove this script and use Orthanc Explorer's "Send to DICOM modality", or
-- POST /modalities/medzero/store, or STOW-RS: POST /dicom-web/servers/medzero/stow {"Resources": ["<study id>"]}.

local FORWARDED_MODALITIES = { CR = true, DX = true, US = true, XC = true, OP = true }
local MEDZERO_MODALITY = 'medzero'       -- the key in DicomModalities
local MEDZERO_AET = 'MEDZERO'

function OnStoredInstance(instanceId, tags, metadata, origin)
   local modality = tags['Modality']
   if modality == nil or not FORWARDED_MODALITIES[modality] then
      return                               -- SR (medzero's results), CT, MR, ...: kept here, not forwarded
   end
   if origin ~= nil and origin['RemoteAet'] == MEDZERO_AET then
      return                               -- medzero never sends images, but never bounce one back to it
   end
   print('medzero autoforward: ' .. modality .. ' instance ' .. instanceId)
   SendToModality(instanceId, MEDZERO_MODALITY)
end
