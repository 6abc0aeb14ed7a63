// Starts one Azure Container Instances group per queue message.
//
// Flow of one run (one run per message, `splitOn`):
//   trigger      "when there are messages in a queue" on <client>-tasks every
//                30 s; the trigger hides each message for `visibilityTimeoutSeconds`
//                (minutes, not the connector's 30 s default) so it cannot fire
//                twice while this run is still deciding what to do with it.
//   Handle       decode (plain or base64 JSON), validate, derive the group name
//                from the client and the sanitized task id, look the name up,
//                and create the group only if it does not exist yet (a PUT on an
//                existing group can restart it).
//   Settle       delete the message once the group exists for this task;
//                otherwise move the message verbatim to <client>-tasks-poison,
//                delete it, and fail the run so the RunsFailed alert fires.
//
// The trigger carries no dequeue count and never deletes a message by itself,
// so every run ends in exactly one of: created + deleted, duplicate + deleted,
// poisoned + deleted. Only when the queue itself fails does a message stay,
// and it comes back after the visibility timeout.
//
// The task containers get WORKER_CLIENT, the storage account and the client id
// of their identity, so a webhook they cannot deliver lands in the outbox
// <client>-webhooks instead of being lost. A second workflow drains that
// outbox with a `worker deliver` group (see `deliver` below), a third deletes
// finished groups (they count against the ACI quota).

@minLength(2)
@maxLength(20)
param client string

param location string = resourceGroup().location
param tags object = {}

param storageAccountName string
param keyVaultName string

@description('Environment variable name -> Key Vault entry name (keyvault.bicep output entryNames).')
param vaultEntryNames object

param registryLoginServer string

@description('Resource id of the user-assigned identity of the worker containers: pulls the image and reaches the queues.')
param identityId string

@description('Client id of that identity (AZURE_CLIENT_ID in the containers).')
param identityClientId string

@description('Full image reference, e.g. myregistry.azurecr.io/worker:<git sha>.')
param image string

@description('vCPU cores per task (a decimal string).')
param cpuCores string = '1'

@description('Memory in GB per task (a decimal string).')
param memoryInGb string = '2'

@description('WORKER_TASK_TIMEOUT in seconds: the only timeout guard on this path.')
param taskTimeoutSeconds int = 1800

param workspaceName string
param actionGroupId string

@allowed([
  'Enabled'
  'Disabled'
])
@description('State of the queue trigger and of the outbox drain. Start Disabled until the first image is in the registry.')
param triggerState string = 'Disabled'

@minValue(10)
param triggerIntervalSeconds int = 30

@description('How long the trigger hides a message it handed to a run. Must cover the lookup, the create with all its retries and the delete.')
@minValue(300)
@maxValue(3600)
param visibilityTimeoutSeconds int = 900

@description('Minutes between two peeks at the webhook outbox (each run is billed, idle or not).')
@minValue(1)
@maxValue(15)
param deliverIntervalMinutes int = 5

@description('Finished groups older than this are deleted by the cleanup workflow.')
@minValue(1)
param finishedRetentionHours int = 2

@description('Groups older than this are deleted whatever their state (stuck pulls, lost runs).')
@minValue(2)
param maxGroupAgeHours int = 12

var tasksQueueName = '${client}-tasks'
var poisonQueueName = '${client}-tasks-poison'
var webhooksQueueName = '${client}-webhooks'
var deliverGroupName = '${client}-webhooks-deliver'
var aciApiVersion = '2023-05-01'
var queueApiVersion = '2021-08-06'
var queueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var queueDataReaderRoleId = '19e7f393-937e-4f77-808e-94535e297925'
var secretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'
var groupsUrl = '${environment().resourceManager}subscriptions/${subscription().subscriptionId}/resourceGroups/${resourceGroup().name}/providers/Microsoft.ContainerInstance/containerGroups'
var armAuth = {
  type: 'ManagedServiceIdentity'
  audience: environment().resourceManager
}
var storageAuth = {
  type: 'ManagedServiceIdentity'
  audience: 'https://storage.azure.com/'
}
var vaultAuth = {
  type: 'ManagedServiceIdentity'
  audience: 'https://${substring(environment().suffixes.keyvaultDns, 1)}'
}
var queuePath = '/v2/storageAccounts/@{encodeURIComponent(encodeURIComponent(\'${storageAccountName}\'))}/queues'
var queueHost = {
  connection: {
    name: '@parameters(\'$connections\')[\'azurequeues\'][\'connectionId\']'
  }
}
var deleteMessageInputs = {
  host: queueHost
  method: 'delete'
  path: '${queuePath}/@{encodeURIComponent(\'${tasksQueueName}\')}/messages/@{encodeURIComponent(triggerBody()?[\'MessageId\'])}'
  queries: {
    popreceipt: '@triggerBody()?[\'PopReceipt\']'
  }
}
var secureInputsAndOutputs = {
  secureData: {
    properties: [
      'inputs'
      'outputs'
    ]
  }
}
var workerTags = {
  'managed-by': 'worker-task'
  'worker-client': client
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

// Created by the storage module (and by the worker when missing).
resource outboxQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = {
  parent: queueService
  name: webhooksQueueName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource webhookSecretEntry 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = {
  parent: vault
  name: vaultEntryNames.WORKER_WEBHOOK_SECRET
}

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' existing = {
  name: workspaceName
}

resource queueConnection 'Microsoft.Web/connections@2016-06-01' = {
  name: 'azurequeues-${client}'
  location: location
  tags: tags
  properties: {
    displayName: 'Queues of ${storageAccountName} (managed identity)'
    api: {
      id: subscriptionResourceId('Microsoft.Web/locations/managedApis', location, 'azurequeues')
    }
    #disable-next-line BCP089
    parameterValueSet: {
      name: 'managedIdentityAuth'
      values: {}
    }
  }
}

resource trigger 'Microsoft.Logic/workflows@2019-05-01' = {
  name: 'la-${client}-worker-trigger'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    state: triggerState
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      parameters: {
        '$connections': {
          type: 'Object'
          defaultValue: {}
        }
        logAnalyticsKey: {
          type: 'SecureString'
          defaultValue: ''
        }
      }
      triggers: {
        When_there_are_messages_in_a_queue: {
          type: 'ApiConnection'
          recurrence: {
            frequency: 'Second'
            interval: triggerIntervalSeconds
          }
          splitOn: '@triggerBody()?[\'QueueMessagesList\']?[\'QueueMessage\']'
          inputs: {
            host: queueHost
            method: 'get'
            path: '${queuePath}/@{encodeURIComponent(\'${tasksQueueName}\')}/message_trigger'
            queries: {
              visibilitytimeout: string(visibilityTimeoutSeconds)
            }
          }
        }
      }
      actions: {
        Init_outcome: {
          type: 'InitializeVariable'
          runAfter: {}
          inputs: {
            variables: [
              {
                name: 'outcome'
                type: 'string'
                value: ''
              }
            ]
          }
        }
        Init_task_text: {
          type: 'InitializeVariable'
          runAfter: {
            Init_outcome: [
              'Succeeded'
            ]
          }
          inputs: {
            variables: [
              {
                name: 'taskText'
                type: 'string'
                value: '@{trim(coalesce(triggerBody()?[\'MessageText\'], \'\'))}'
              }
            ]
          }
        }
        Handle: {
          type: 'Scope'
          runAfter: {
            Init_task_text: [
              'Succeeded'
            ]
          }
          actions: {
            // The same rule as the worker's decoder: a JSON envelope starts
            // with `{`, which is not a base64 character.
            If_base64: {
              type: 'If'
              runAfter: {}
              expression: {
                and: [
                  {
                    not: {
                      startsWith: [
                        '@variables(\'taskText\')'
                        '{'
                      ]
                    }
                  }
                ]
              }
              actions: {
                Decode_base64: {
                  type: 'Compose'
                  runAfter: {}
                  inputs: '@base64ToString(variables(\'taskText\'))'
                }
                Use_decoded_text: {
                  type: 'SetVariable'
                  runAfter: {
                    Decode_base64: [
                      'Succeeded'
                    ]
                  }
                  inputs: {
                    name: 'taskText'
                    value: '@{outputs(\'Decode_base64\')}'
                  }
                }
              }
              else: {
                actions: {}
              }
            }
            Parse_task: {
              type: 'ParseJson'
              runAfter: {
                If_base64: [
                  'Succeeded'
                ]
              }
              inputs: {
                content: '@json(variables(\'taskText\'))'
                schema: {
                  type: 'object'
                  required: [
                    'task_id'
                    'task_type'
                  ]
                  properties: {
                    task_id: {
                      type: 'string'
                      minLength: 1
                      // At least one character survives sanitizing.
                      pattern: '[A-Za-z0-9]'
                    }
                    task_type: {
                      type: 'string'
                      minLength: 1
                    }
                    payload: {}
                    webhook_url: {
                      type: [
                        'string'
                        'null'
                      ]
                    }
                  }
                }
              }
            }
            // Group name: <client>-<task id>, lowercased, every character
            // outside [a-z0-9] replaced by `-`, hyphen runs collapsed, cut to
            // 63 characters, no trailing hyphen. Deterministic, so a repeated
            // message finds the group its first delivery created.
            Lower_task_id: {
              type: 'Compose'
              runAfter: {
                Parse_task: [
                  'Succeeded'
                ]
              }
              inputs: '@toLower(take(body(\'Parse_task\')?[\'task_id\'], 80))'
            }
            Task_id_chars: {
              type: 'Select'
              runAfter: {
                Lower_task_id: [
                  'Succeeded'
                ]
              }
              inputs: {
                from: '@range(0, length(outputs(\'Lower_task_id\')))'
                select: '@if(contains(\'abcdefghijklmnopqrstuvwxyz0123456789\', substring(outputs(\'Lower_task_id\'), item(), 1)), substring(outputs(\'Lower_task_id\'), item(), 1), \'-\')'
              }
            }
            Group_name_raw: {
              type: 'Compose'
              runAfter: {
                Task_id_chars: [
                  'Succeeded'
                ]
              }
              // Seven passes collapse any run of up to 81 hyphens.
              inputs: '@take(replace(replace(replace(replace(replace(replace(replace(concat(\'${client}-\', join(body(\'Task_id_chars\'), \'\')), \'--\', \'-\'), \'--\', \'-\'), \'--\', \'-\'), \'--\', \'-\'), \'--\', \'-\'), \'--\', \'-\'), \'--\', \'-\'), 63)'
            }
            Group_name: {
              type: 'Compose'
              runAfter: {
                Group_name_raw: [
                  'Succeeded'
                ]
              }
              inputs: '@if(endsWith(outputs(\'Group_name_raw\'), \'-\'), substring(outputs(\'Group_name_raw\'), 0, sub(length(outputs(\'Group_name_raw\')), 1)), outputs(\'Group_name_raw\'))'
            }
            Look_up_group: {
              type: 'Http'
              runAfter: {
                Group_name: [
                  'Succeeded'
                ]
              }
              inputs: {
                method: 'GET'
                uri: '${groupsUrl}/@{outputs(\'Group_name\')}?api-version=${aciApiVersion}'
                authentication: armAuth
              }
              retryPolicy: {
                type: 'exponential'
                count: 3
                interval: 'PT10S'
              }
            }
            // 404 is the normal case and marks the lookup Failed; the switch
            // runs after either and routes on the status code.
            Route: {
              type: 'Switch'
              runAfter: {
                Look_up_group: [
                  'Succeeded'
                  'Failed'
                ]
              }
              expression: '@coalesce(outputs(\'Look_up_group\')?[\'statusCode\'], 0)'
              cases: {
                Exists: {
                  case: 200
                  actions: {
                    Same_task: {
                      type: 'If'
                      runAfter: {}
                      expression: {
                        and: [
                          {
                            equals: [
                              '@body(\'Look_up_group\')?[\'tags\']?[\'worker-task-id\']'
                              '@take(body(\'Parse_task\')?[\'task_id\'], 256)'
                            ]
                          }
                        ]
                      }
                      actions: {
                        Mark_duplicate: {
                          type: 'SetVariable'
                          runAfter: {}
                          inputs: {
                            name: 'outcome'
                            value: 'duplicate'
                          }
                        }
                      }
                      else: {
                        actions: {
                          // Two task ids that sanitize to the same name: never
                          // overwrite another task's group.
                          Mark_collision: {
                            type: 'SetVariable'
                            runAfter: {}
                            inputs: {
                              name: 'outcome'
                              value: 'NameCollision'
                            }
                          }
                        }
                      }
                    }
                  }
                }
                Absent: {
                  case: 404
                  actions: {
                    Get_WORKER_WEBHOOK_SECRET: {
                      type: 'Http'
                      runAfter: {}
                      inputs: {
                        method: 'GET'
                        uri: '${vault.properties.vaultUri}secrets/${vaultEntryNames.WORKER_WEBHOOK_SECRET}?api-version=7.4'
                        authentication: vaultAuth
                      }
                      runtimeConfiguration: secureInputsAndOutputs
                    }
                    Get_SUPABASE_KEY: {
                      type: 'Http'
                      runAfter: {}
                      inputs: {
                        method: 'GET'
                        uri: '${vault.properties.vaultUri}secrets/${vaultEntryNames.SUPABASE_KEY}?api-version=7.4'
                        authentication: vaultAuth
                      }
                      runtimeConfiguration: secureInputsAndOutputs
                    }
                    Get_OPENAI_API_KEY: {
                      type: 'Http'
                      runAfter: {}
                      inputs: {
                        method: 'GET'
                        uri: '${vault.properties.vaultUri}secrets/${vaultEntryNames.OPENAI_API_KEY}?api-version=7.4'
                        authentication: vaultAuth
                      }
                      runtimeConfiguration: secureInputsAndOutputs
                    }
                    Create_group: {
                      type: 'Http'
                      runAfter: {
                        Get_WORKER_WEBHOOK_SECRET: [
                          'Succeeded'
                        ]
                        Get_SUPABASE_KEY: [
                          'Succeeded'
                        ]
                        Get_OPENAI_API_KEY: [
                          'Succeeded'
                        ]
                      }
                      runtimeConfiguration: secureInputsAndOutputs
                      retryPolicy: {
                        type: 'exponential'
                        count: 4
                        interval: 'PT15S'
                        minimumInterval: 'PT10S'
                        maximumInterval: 'PT2M'
                      }
                      inputs: {
                        method: 'PUT'
                        uri: '${groupsUrl}/@{outputs(\'Group_name\')}?api-version=${aciApiVersion}'
                        authentication: armAuth
                        body: {
                          location: location
                          tags: union(workerTags, {
                            'worker-task-id': '@{take(body(\'Parse_task\')?[\'task_id\'], 256)}'
                            'worker-created': '@{utcNow()}'
                          })
                          identity: {
                            type: 'UserAssigned'
                            userAssignedIdentities: {
                              '${identityId}': {}
                            }
                          }
                          properties: {
                            osType: 'Linux'
                            sku: 'Standard'
                            restartPolicy: 'Never'
                            imageRegistryCredentials: [
                              {
                                server: registryLoginServer
                                identity: identityId
                              }
                            ]
                            containers: [
                              {
                                name: 'worker'
                                properties: {
                                  image: image
                                  resources: {
                                    requests: {
                                      cpu: json(cpuCores)
                                      memoryInGB: json(memoryInGb)
                                    }
                                  }
                                  environmentVariables: [
                                    {
                                      name: 'TASK_DATA'
                                      value: '@{triggerBody()?[\'MessageText\']}'
                                    }
                                    {
                                      name: 'WORKER_LOG_FORMAT'
                                      value: 'json'
                                    }
                                    {
                                      name: 'WORKER_TASK_TIMEOUT'
                                      value: string(taskTimeoutSeconds)
                                    }
                                    // A webhook the container cannot deliver
                                    // goes to <client>-webhooks, written with
                                    // the group's identity (no storage key).
                                    {
                                      name: 'WORKER_CLIENT'
                                      value: client
                                    }
                                    {
                                      name: 'AZURE_STORAGE_ACCOUNT'
                                      value: storageAccountName
                                    }
                                    {
                                      name: 'AZURE_CLIENT_ID'
                                      value: identityClientId
                                    }
                                    {
                                      name: 'WORKER_WEBHOOK_SECRET'
                                      secureValue: '@{body(\'Get_WORKER_WEBHOOK_SECRET\')?[\'value\']}'
                                    }
                                    {
                                      name: 'SUPABASE_KEY'
                                      secureValue: '@{body(\'Get_SUPABASE_KEY\')?[\'value\']}'
                                    }
                                    {
                                      name: 'OPENAI_API_KEY'
                                      secureValue: '@{body(\'Get_OPENAI_API_KEY\')?[\'value\']}'
                                    }
                                  ]
                                }
                              }
                            ]
                            diagnostics: {
                              logAnalytics: {
                                workspaceId: workspace.properties.customerId
                                workspaceKey: '@{parameters(\'logAnalyticsKey\')}'
                                logType: 'ContainerInstanceLogs'
                              }
                            }
                          }
                        }
                      }
                    }
                    Mark_created: {
                      type: 'SetVariable'
                      runAfter: {
                        Create_group: [
                          'Succeeded'
                        ]
                      }
                      inputs: {
                        name: 'outcome'
                        value: 'created'
                      }
                    }
                  }
                }
              }
              default: {
                actions: {
                  Mark_lookup_failed: {
                    type: 'SetVariable'
                    runAfter: {}
                    inputs: {
                      name: 'outcome'
                      value: 'LookupFailed'
                    }
                  }
                }
              }
            }
          }
        }
        Settle: {
          type: 'If'
          runAfter: {
            Handle: [
              'Succeeded'
              'Failed'
              'TimedOut'
              'Skipped'
            ]
          }
          expression: {
            or: [
              {
                equals: [
                  '@variables(\'outcome\')'
                  'created'
                ]
              }
              {
                equals: [
                  '@variables(\'outcome\')'
                  'duplicate'
                ]
              }
            ]
          }
          actions: {
            Delete_message: {
              type: 'ApiConnection'
              runAfter: {}
              inputs: deleteMessageInputs
            }
          }
          else: {
            actions: {
              Move_to_poison: {
                type: 'ApiConnection'
                runAfter: {}
                inputs: {
                  host: queueHost
                  method: 'post'
                  path: '${queuePath}/@{encodeURIComponent(\'${poisonQueueName}\')}/messages'
                  body: '@triggerBody()?[\'MessageText\']'
                }
              }
              Delete_poisoned_message: {
                type: 'ApiConnection'
                runAfter: {
                  Move_to_poison: [
                    'Succeeded'
                  ]
                }
                inputs: deleteMessageInputs
              }
              Fail_run: {
                type: 'Terminate'
                runAfter: {
                  Delete_poisoned_message: [
                    'Succeeded'
                  ]
                }
                inputs: {
                  runStatus: 'Failed'
                  runError: {
                    code: '@{if(empty(variables(\'outcome\')), \'TaskNotStarted\', variables(\'outcome\'))}'
                    message: 'Message @{triggerBody()?[\'MessageId\']} moved to ${poisonQueueName}: invalid task, name collision, or the container group could not be created (see the Handle scope of this run).'
                  }
                }
              }
            }
          }
        }
      }
      outputs: {}
    }
    parameters: {
      '$connections': {
        value: {
          azurequeues: {
            id: subscriptionResourceId('Microsoft.Web/locations/managedApis', location, 'azurequeues')
            connectionId: queueConnection.id
            connectionName: queueConnection.name
            connectionProperties: {
              authentication: {
                type: 'ManagedServiceIdentity'
              }
            }
          }
        }
      }
      logAnalyticsKey: {
        value: workspace.listKeys().primarySharedKey
      }
    }
  }
}

resource cleanup 'Microsoft.Logic/workflows@2019-05-01' = {
  name: 'la-${client}-worker-cleanup'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    state: 'Enabled'
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      parameters: {}
      triggers: {
        Every_hour: {
          type: 'Recurrence'
          recurrence: {
            frequency: 'Hour'
            interval: 1
          }
        }
      }
      actions: {
        List_groups: {
          type: 'Http'
          runAfter: {}
          inputs: {
            method: 'GET'
            uri: '${groupsUrl}?api-version=${aciApiVersion}'
            authentication: armAuth
          }
          runtimeConfiguration: {
            paginationPolicy: {
              minimumItemCount: 1000
            }
          }
        }
        Worker_groups: {
          type: 'Query'
          runAfter: {
            List_groups: [
              'Succeeded'
            ]
          }
          inputs: {
            from: '@body(\'List_groups\')?[\'value\']'
            where: '@and(equals(item()?[\'tags\']?[\'managed-by\'], \'worker-task\'), equals(item()?[\'tags\']?[\'worker-client\'], \'${client}\'))'
          }
        }
        For_each_group: {
          type: 'Foreach'
          foreach: '@body(\'Worker_groups\')'
          runAfter: {
            Worker_groups: [
              'Succeeded'
            ]
          }
          runtimeConfiguration: {
            concurrency: {
              repetitions: 5
            }
          }
          actions: {
            // The list omits the instance view; the state and finish time
            // need one GET per group.
            Get_group: {
              type: 'Http'
              runAfter: {}
              inputs: {
                method: 'GET'
                uri: '${groupsUrl}/@{items(\'For_each_group\')?[\'name\']}?api-version=${aciApiVersion}'
                authentication: armAuth
              }
            }
            Is_expired: {
              type: 'If'
              runAfter: {
                Get_group: [
                  'Succeeded'
                ]
              }
              expression: {
                or: [
                  {
                    and: [
                      {
                        contains: [
                          '@createArray(\'Succeeded\', \'Failed\', \'Stopped\')'
                          '@body(\'Get_group\')?[\'properties\']?[\'instanceView\']?[\'state\']'
                        ]
                      }
                      {
                        less: [
                          '@ticks(coalesce(body(\'Get_group\')?[\'properties\']?[\'containers\']?[0]?[\'properties\']?[\'instanceView\']?[\'currentState\']?[\'finishTime\'], utcNow()))'
                          '@ticks(addHours(utcNow(), -${finishedRetentionHours}))'
                        ]
                      }
                    ]
                  }
                  {
                    less: [
                      '@ticks(coalesce(body(\'Get_group\')?[\'tags\']?[\'worker-created\'], utcNow()))'
                      '@ticks(addHours(utcNow(), -${maxGroupAgeHours}))'
                    ]
                  }
                ]
              }
              actions: {
                Delete_group: {
                  type: 'Http'
                  runAfter: {}
                  inputs: {
                    method: 'DELETE'
                    uri: '${groupsUrl}/@{items(\'For_each_group\')?[\'name\']}?api-version=${aciApiVersion}'
                    authentication: armAuth
                  }
                }
              }
              else: {
                actions: {}
              }
            }
          }
        }
      }
      outputs: {}
    }
  }
}

// Drains the webhook outbox. A task container that cannot deliver its webhook
// writes the event to <client>-webhooks, invisible until its next attempt is
// due; someone has to run `worker deliver` then. Every `deliverIntervalMinutes`
// this workflow peeks the outbox (peek changes nothing: no dequeue count, no
// visibility) and, when an entry is due and no deliver group is running,
// starts the group <client>-webhooks-deliver running
// `worker deliver --exit-when-empty` (same image and identity as the task
// groups; it exits once nothing is due). A finished deliver group is deleted
// first, so every drain starts with the current image and secret. Runs never
// overlap (trigger concurrency 1).
resource deliver 'Microsoft.Logic/workflows@2019-05-01' = {
  name: 'la-${client}-worker-deliver'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    state: triggerState
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      parameters: {
        logAnalyticsKey: {
          type: 'SecureString'
          defaultValue: ''
        }
      }
      triggers: {
        Every_few_minutes: {
          type: 'Recurrence'
          recurrence: {
            frequency: 'Minute'
            interval: deliverIntervalMinutes
          }
          runtimeConfiguration: {
            concurrency: {
              runs: 1
            }
          }
        }
      }
      actions: {
        Init_due: {
          type: 'InitializeVariable'
          runAfter: {}
          inputs: {
            variables: [
              {
                name: 'due'
                type: 'boolean'
                value: false
              }
            ]
          }
        }
        Init_start: {
          type: 'InitializeVariable'
          runAfter: {
            Init_due: [
              'Succeeded'
            ]
          }
          inputs: {
            variables: [
              {
                name: 'start'
                type: 'boolean'
                value: false
              }
            ]
          }
        }
        // Visible entries only: one that waits for its next attempt is
        // invisible and does not show up here.
        Peek_outbox: {
          type: 'Http'
          runAfter: {
            Init_start: [
              'Succeeded'
            ]
          }
          inputs: {
            method: 'GET'
            uri: '${storage.properties.primaryEndpoints.queue}${webhooksQueueName}/messages?peekonly=true&numofmessages=1'
            headers: {
              'x-ms-version': queueApiVersion
            }
            authentication: storageAuth
          }
          retryPolicy: {
            type: 'exponential'
            count: 3
            interval: 'PT10S'
          }
        }
        // 200 with an empty <QueueMessagesList />: nothing due. 404: the
        // outbox does not exist (yet), so nothing was ever deferred. Anything
        // else (403: the role is missing) fails the run.
        Route_peek: {
          type: 'Switch'
          runAfter: {
            Peek_outbox: [
              'Succeeded'
              'Failed'
            ]
          }
          expression: '@coalesce(outputs(\'Peek_outbox\')?[\'statusCode\'], 0)'
          cases: {
            Peeked: {
              case: 200
              actions: {
                If_entry_due: {
                  type: 'If'
                  runAfter: {}
                  expression: {
                    and: [
                      {
                        greater: [
                          '@xpath(xml(body(\'Peek_outbox\')), \'count(/QueueMessagesList/QueueMessage)\')'
                          0
                        ]
                      }
                    ]
                  }
                  actions: {
                    Mark_due: {
                      type: 'SetVariable'
                      runAfter: {}
                      inputs: {
                        name: 'due'
                        value: true
                      }
                    }
                  }
                  else: {
                    actions: {}
                  }
                }
              }
            }
            No_outbox: {
              case: 404
              actions: {}
            }
          }
          default: {
            actions: {
              Fail_peek: {
                type: 'Terminate'
                runAfter: {}
                inputs: {
                  runStatus: 'Failed'
                  runError: {
                    code: 'OutboxUnreadable'
                    message: 'Peeking ${webhooksQueueName} failed: check the Storage Queue Data Reader role of this workflow on the queue.'
                  }
                }
              }
            }
          }
        }
        // The variables decide; `Failed` is accepted too because a handled
        // 404 inside a branch may mark the branch Failed (as in the trigger).
        Check_deliver_group: {
          type: 'If'
          runAfter: {
            Route_peek: [
              'Succeeded'
              'Failed'
            ]
          }
          expression: {
            and: [
              {
                equals: [
                  '@variables(\'due\')'
                  true
                ]
              }
            ]
          }
          actions: {
            Look_up_deliver_group: {
              type: 'Http'
              runAfter: {}
              inputs: {
                method: 'GET'
                uri: '${groupsUrl}/${deliverGroupName}?api-version=${aciApiVersion}'
                authentication: armAuth
              }
              retryPolicy: {
                type: 'exponential'
                count: 3
                interval: 'PT10S'
              }
            }
            Route_group: {
              type: 'Switch'
              runAfter: {
                Look_up_deliver_group: [
                  'Succeeded'
                  'Failed'
                ]
              }
              expression: '@coalesce(outputs(\'Look_up_deliver_group\')?[\'statusCode\'], 0)'
              cases: {
                Exists: {
                  case: 200
                  actions: {
                    Is_deliver_group: {
                      type: 'If'
                      runAfter: {}
                      expression: {
                        and: [
                          {
                            equals: [
                              '@body(\'Look_up_deliver_group\')?[\'tags\']?[\'worker-role\']'
                              'deliver'
                            ]
                          }
                        ]
                      }
                      actions: {
                        // Running or pending: it drains what is due; come back
                        // next time. Finished: delete it and start afresh (a
                        // PUT on the existing group would not run it again).
                        If_finished: {
                          type: 'If'
                          runAfter: {}
                          expression: {
                            and: [
                              {
                                contains: [
                                  '@createArray(\'Succeeded\', \'Failed\', \'Stopped\')'
                                  '@body(\'Look_up_deliver_group\')?[\'properties\']?[\'instanceView\']?[\'state\']'
                                ]
                              }
                            ]
                          }
                          actions: {
                            Delete_finished_deliver_group: {
                              type: 'Http'
                              runAfter: {}
                              inputs: {
                                method: 'DELETE'
                                uri: '${groupsUrl}/${deliverGroupName}?api-version=${aciApiVersion}'
                                authentication: armAuth
                              }
                              retryPolicy: {
                                type: 'exponential'
                                count: 3
                                interval: 'PT10S'
                              }
                            }
                            Mark_restart: {
                              type: 'SetVariable'
                              runAfter: {
                                Delete_finished_deliver_group: [
                                  'Succeeded'
                                ]
                              }
                              inputs: {
                                name: 'start'
                                value: true
                              }
                            }
                            Fail_delete: {
                              type: 'Terminate'
                              runAfter: {
                                Delete_finished_deliver_group: [
                                  'Failed'
                                  'TimedOut'
                                ]
                              }
                              inputs: {
                                runStatus: 'Failed'
                                runError: {
                                  code: 'DeleteFailed'
                                  message: 'Deleting the finished container group ${deliverGroupName} failed; the next run tries again.'
                                }
                              }
                            }
                          }
                          else: {
                            actions: {}
                          }
                        }
                      }
                      else: {
                        actions: {
                          // A task group took the name (task id
                          // "webhooks-deliver"): never touch it.
                          Fail_name_taken: {
                            type: 'Terminate'
                            runAfter: {}
                            inputs: {
                              runStatus: 'Failed'
                              runError: {
                                code: 'NameCollision'
                                message: 'Container group ${deliverGroupName} exists but is no deliver group; the outbox waits until it is gone.'
                              }
                            }
                          }
                        }
                      }
                    }
                  }
                }
                Absent: {
                  case: 404
                  actions: {
                    Mark_start: {
                      type: 'SetVariable'
                      runAfter: {}
                      inputs: {
                        name: 'start'
                        value: true
                      }
                    }
                  }
                }
              }
              default: {
                actions: {
                  Fail_lookup: {
                    type: 'Terminate'
                    runAfter: {}
                    inputs: {
                      runStatus: 'Failed'
                      runError: {
                        code: 'LookupFailed'
                        message: 'Looking up container group ${deliverGroupName} failed.'
                      }
                    }
                  }
                }
              }
            }
          }
          else: {
            actions: {}
          }
        }
        Start_deliver_group: {
          type: 'If'
          runAfter: {
            Check_deliver_group: [
              'Succeeded'
              'Failed'
            ]
          }
          expression: {
            and: [
              {
                equals: [
                  '@variables(\'start\')'
                  true
                ]
              }
            ]
          }
          actions: {
            // `worker deliver` runs no handler: the webhook secret is the
            // only secret it needs.
            Get_WORKER_WEBHOOK_SECRET: {
              type: 'Http'
              runAfter: {}
              inputs: {
                method: 'GET'
                uri: '${vault.properties.vaultUri}secrets/${vaultEntryNames.WORKER_WEBHOOK_SECRET}?api-version=7.4'
                authentication: vaultAuth
              }
              runtimeConfiguration: secureInputsAndOutputs
            }
            Create_deliver_group: {
              type: 'Http'
              runAfter: {
                Get_WORKER_WEBHOOK_SECRET: [
                  'Succeeded'
                ]
              }
              runtimeConfiguration: secureInputsAndOutputs
              retryPolicy: {
                type: 'exponential'
                count: 4
                interval: 'PT15S'
                minimumInterval: 'PT10S'
                maximumInterval: 'PT2M'
              }
              inputs: {
                method: 'PUT'
                uri: '${groupsUrl}/${deliverGroupName}?api-version=${aciApiVersion}'
                authentication: armAuth
                body: {
                  location: location
                  tags: union(workerTags, {
                    'worker-role': 'deliver'
                    'worker-created': '@{utcNow()}'
                  })
                  identity: {
                    type: 'UserAssigned'
                    userAssignedIdentities: {
                      '${identityId}': {}
                    }
                  }
                  properties: {
                    osType: 'Linux'
                    sku: 'Standard'
                    restartPolicy: 'Never'
                    imageRegistryCredentials: [
                      {
                        server: registryLoginServer
                        identity: identityId
                      }
                    ]
                    containers: [
                      {
                        name: 'worker'
                        properties: {
                          image: image
                          // ACI's command replaces the image's entrypoint.
                          command: [
                            '/usr/local/bin/worker'
                            'deliver'
                            '--exit-when-empty'
                          ]
                          resources: {
                            requests: {
                              cpu: json(cpuCores)
                              memoryInGB: json(memoryInGb)
                            }
                          }
                          environmentVariables: [
                            {
                              name: 'WORKER_LOG_FORMAT'
                              value: 'json'
                            }
                            {
                              name: 'WORKER_CLIENT'
                              value: client
                            }
                            {
                              name: 'AZURE_STORAGE_ACCOUNT'
                              value: storageAccountName
                            }
                            {
                              name: 'AZURE_CLIENT_ID'
                              value: identityClientId
                            }
                            {
                              name: 'WORKER_WEBHOOK_SECRET'
                              secureValue: '@{body(\'Get_WORKER_WEBHOOK_SECRET\')?[\'value\']}'
                            }
                          ]
                        }
                      }
                    ]
                    diagnostics: {
                      logAnalytics: {
                        workspaceId: workspace.properties.customerId
                        workspaceKey: '@{parameters(\'logAnalyticsKey\')}'
                        logType: 'ContainerInstanceLogs'
                      }
                    }
                  }
                }
              }
            }
          }
          else: {
            actions: {}
          }
        }
      }
      outputs: {}
    }
    parameters: {
      logAnalyticsKey: {
        value: workspace.listKeys().primarySharedKey
      }
    }
  }
}

// The three workflows manage container groups in this resource group and
// nothing else: read/write/delete groups, and attach the runtime identity to
// them.
resource launcherRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'worker-task-launcher')
  properties: {
    roleName: 'Worker task launcher (${resourceGroup().name})'
    description: 'Create, read and delete container groups and assign the worker identity to them.'
    type: 'CustomRole'
    assignableScopes: [
      resourceGroup().id
    ]
    permissions: [
      {
        actions: [
          'Microsoft.ContainerInstance/containerGroups/read'
          'Microsoft.ContainerInstance/containerGroups/write'
          'Microsoft.ContainerInstance/containerGroups/delete'
          'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action'
        ]
        notActions: []
      }
    ]
  }
}

resource triggerLauncher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, trigger.id, 'worker-task-launcher')
  properties: {
    roleDefinitionId: launcherRole.id
    principalId: trigger.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource cleanupLauncher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, cleanup.id, 'worker-task-launcher')
  properties: {
    roleDefinitionId: launcherRole.id
    principalId: cleanup.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource deliverLauncher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, deliver.id, 'worker-task-launcher')
  properties: {
    roleDefinitionId: launcherRole.id
    principalId: deliver.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// Peek at the outbox and nothing else: read-only, on that one queue.
resource deliverOutboxReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(outboxQueue.id, deliver.id, queueDataReaderRoleId)
  scope: outboxQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', queueDataReaderRoleId)
    principalId: deliver.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The deliver group needs the webhook secret only.
resource deliverSecret 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(webhookSecretEntry.id, deliver.id, secretsUserRoleId)
  scope: webhookSecretEntry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: deliver.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource triggerQueues 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, trigger.id, queueDataContributorRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', queueDataContributorRoleId)
    principalId: trigger.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource triggerSecrets 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, trigger.id, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: trigger.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource triggerDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: trigger
  properties: {
    workspaceId: workspace.id
    logs: [
      {
        category: 'WorkflowRuntime'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

resource cleanupDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: cleanup
  properties: {
    workspaceId: workspace.id
    logs: [
      {
        category: 'WorkflowRuntime'
        enabled: true
      }
    ]
  }
}

resource deliverDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: deliver
  properties: {
    workspaceId: workspace.id
    logs: [
      {
        category: 'WorkflowRuntime'
        enabled: true
      }
    ]
  }
}

// Every path that poisons a message ends the run Failed, so this one alert
// covers invalid tasks, name collisions and create failures alike.
resource failedRunsAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${client}-worker-trigger-failed-runs'
  location: 'global'
  tags: tags
  properties: {
    description: 'A queue message could not be turned into a container group and was moved to ${poisonQueueName}.'
    severity: 2
    enabled: true
    scopes: [
      trigger.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'RunsFailed'
          metricNamespace: 'Microsoft.Logic/workflows'
          metricName: 'RunsFailed'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

// A failing trigger (connection or role broken) starts no run at all, so the
// run alert above would stay silent.
resource failedTriggersAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${client}-worker-trigger-failed-polls'
  location: 'global'
  tags: tags
  properties: {
    description: 'The queue trigger cannot read ${tasksQueueName}: check the azurequeues connection and the Logic App role on the storage account.'
    severity: 2
    enabled: true
    scopes: [
      trigger.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'TriggersFailed'
          metricNamespace: 'Microsoft.Logic/workflows'
          metricName: 'TriggersFailed'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

resource failedCleanupAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${client}-worker-cleanup-failed-runs'
  location: 'global'
  tags: tags
  properties: {
    description: 'Finished container groups are not being deleted; they count against the ACI quota.'
    severity: 3
    enabled: true
    scopes: [
      cleanup.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT6H'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'RunsFailed'
          metricNamespace: 'Microsoft.Logic/workflows'
          metricName: 'RunsFailed'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

// A drain that fails again and again (role missing, image gone, quota) leaves
// webhooks in the outbox until their schedule runs out and they are poisoned.
resource failedDeliverAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${client}-worker-deliver-failed-runs'
  location: 'global'
  tags: tags
  properties: {
    description: 'The outbox drain keeps failing: webhooks wait in ${webhooksQueueName} and end in ${webhooksQueueName}-poison when their schedule runs out.'
    severity: 3
    enabled: true
    scopes: [
      deliver.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'RunsFailed'
          metricNamespace: 'Microsoft.Logic/workflows'
          metricName: 'RunsFailed'
          operator: 'GreaterThan'
          threshold: 2
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

output triggerWorkflowName string = trigger.name
output cleanupWorkflowName string = cleanup.name
output deliverWorkflowName string = deliver.name
output triggerPrincipalId string = trigger.identity.principalId
output tasksQueueName string = tasksQueueName
output poisonQueueName string = poisonQueueName
output webhooksQueueName string = webhooksQueueName
