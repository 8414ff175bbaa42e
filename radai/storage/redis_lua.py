"""Lua scripts of the job streams (radai.storage.redis_streams): each runs atomically inside Redis."""

# KEYS: stream, marker. ARGV: group, marker ttl (s), field, value, ... -> entry id, or nil for a duplicate.
PUBLISH = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return id
"""

# KEYS: stream [, dead-letter stream]. ARGV: group, entry id [, dead maxlen, field, value, ...].
# Acknowledges, optionally copies to the dead letters, then trims every entry older than the oldest pending
# one (all of those are delivered and acknowledged: delivery follows id order); with nothing pending, up to
# and including the group's last delivered entry. Returns XACK's count.
ACK = """
if #KEYS == 2 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
end
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local oldest = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
if not oldest then
  local last = ARGV[2]
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
  end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  oldest = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end
redis.call('XTRIM', KEYS[1], 'MINID', oldest)
return n
"""

# KEYS: stream. ARGV: group, consumer, entry id, idle ms, retry count or ''. Re-claims an entry this consumer
# still owns (JUSTID: the delivery counter is left alone unless RETRYCOUNT sets it). Returns 1, or 0 when
# another consumer has claimed it meanwhile or it is no longer pending.
OWNED_CLAIM = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4]}
if ARGV[5] ~= '' then
  table.insert(args, 'RETRYCOUNT')
  table.insert(args, ARGV[5])
end
table.insert(args, 'JUSTID')
return #redis.call(unpack(args))
"""

# KEYS: stream. ARGV: group, min idle ms. Deletes consumers that hold nothing and were silent that long (one
# per restarted worker pod otherwise stays forever); atomic, so none takes a job between check and delete.
PRUNE = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""
